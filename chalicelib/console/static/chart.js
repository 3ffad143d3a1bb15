/* rft-hub console: a tiny SVG chart (no vendor library).
 *
 * RftChart.series(el, {points: [{x, step, t, values}], series, markers: [{x, label}], xLabel}) draws
 * one panel per series (each {key, label, unit, minSpan, floor}: its label names its unit, and its
 * y range is at least minSpan and 10% of the values' size, so a small change is drawn small), stacked on one shared x axis (the training step, each step's time shown on
 * hover), so reward, response length and entropy line up; markers (e.g. training watch findings)
 * are vertical lines across every panel. Hover, touch or the arrow keys show the
 * values at the nearest point. Every drawn point is a <circle class="pt"> with data-series,
 * data-step, data-t and data-value, and the caller adds a data table for screen readers.
 *
 * RftChart.bars(el, {items: [{label, value, text}]}) draws a small bar chart with hover values.
 */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var LABEL_H = 16;

  function svgEl(name, attrs, parent) {
    var el = document.createElementNS(NS, name);
    for (var k in attrs) if (attrs[k] !== undefined && attrs[k] !== null) el.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(el);
    return el;
  }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    var span = hi - lo, step = Math.pow(10, Math.floor(Math.log10(span / count)));
    var err = span / count / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var out = [], v = Math.ceil(lo / step) * step;
    for (; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    return out;
  }

  /** Formats the ticks of one axis with as many decimals as their spacing needs. */
  function tickFmt(ticks) {
    var step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : 1;
    var decimals = Math.max(0, Math.min(6, Math.ceil(-Math.log10(step) - 1e-9)));
    return function (v) { return decimals === 0 ? Math.round(v).toLocaleString() : v.toFixed(decimals); };
  }

  function fmtNum(v) {
    if (v === null || v === undefined || isNaN(v)) return "–";
    var a = Math.abs(v);
    if (a >= 1000) return Math.round(v).toLocaleString();
    if (a >= 10) return v.toFixed(1);
    if (a > 0 && a < 0.001) return v.toPrecision(2);
    return v.toFixed(3);
  }

  function series(el, opts) {
    var points = opts.points || [], defs = opts.series || [], markers = opts.markers || [];
    el.classList.add("chart");
    el.setAttribute("tabindex", "0");
    el.setAttribute("data-points", String(points.length));
    function draw() {
      el.textContent = "";
      var width = Math.max(280, el.clientWidth || 600), left = 56, right = 14, top = 8;
      var panelH = width < 500 ? 90 : 120, gap = 14, axisH = 24;
      var heights = defs.map(function (_, i) { return i === 0 ? Math.round(panelH * 1.35) : panelH; });
      var total = top + heights.reduce(function (a, b) { return a + LABEL_H + b + gap; }, 0) + axisH;
      var svg = svgEl("svg", {viewBox: "0 0 " + width + " " + total, width: width, height: total,
                              role: "img", "aria-label": opts.label || "chart"});
      el.appendChild(svg);
      var xs = points.map(function (p) { return p.x; });
      var t0 = Math.min.apply(null, xs.concat(markers.map(function (m) { return m.x; })));
      var t1 = Math.max.apply(null, xs.concat(markers.map(function (m) { return m.x; })));
      if (!isFinite(t0)) { t0 = 0; t1 = 1; }
      if (t1 <= t0) { t1 = t0 + 1; }
      var pad = (t1 - t0) * 0.02;
      t0 -= pad; t1 += pad;
      function x(t) { return left + (t - t0) / (t1 - t0) * (width - left - right); }
      var y0 = top, panels = [];
      defs.forEach(function (def, i) {
        var h = heights[i], vals = points.map(function (p) { return p.values[def.key]; })
          .filter(function (v) { return typeof v === "number" && isFinite(v); });
        var lo = vals.length ? Math.min.apply(null, vals) : 0, hi = vals.length ? Math.max.apply(null, vals) : 1;
        if (def.min !== undefined) lo = Math.min(lo, def.min);
        if (def.max !== undefined) hi = Math.max(hi, def.max);
        // A sensible minimum range: a small change is drawn small (10.12 -> 10.18 is not a full-height
        // swing). At least def.minSpan, and at least 10% of the values' size; centred on the data,
        // never below def.floor (a count or a length is never negative).
        var span = Math.max(def.minSpan || 0, Math.abs(lo + hi) / 2 * 0.1, 1e-6);
        if (hi - lo < span) {
          var mid = (lo + hi) / 2; lo = mid - span / 2; hi = mid + span / 2;
          if (def.floor !== undefined && lo < def.floor) { hi += def.floor - lo; lo = def.floor; }
        }
        var ypad = (hi - lo) * 0.08; lo -= ypad; hi += ypad;
        var yTop = y0 + LABEL_H;                        // the panel's name sits above its plot
        function y(v) { return yTop + h - (v - lo) / (hi - lo) * h; }
        var g = svgEl("g", {"class": "panel", "data-series": def.key, "data-lo": lo, "data-hi": hi,
                            "data-top": yTop, "data-height": h}, svg);
        var grid = svgEl("g", {"class": "grid axis"}, g);
        var yt = niceTicks(lo, hi, 3), yf = tickFmt(yt);
        yt.forEach(function (v) {
          svgEl("line", {x1: left, x2: width - right, y1: y(v), y2: y(v)}, grid);
          svgEl("text", {x: left - 6, y: y(v) + 4, "text-anchor": "end"}, grid).textContent = yf(v);
        });
        svgEl("text", {"class": "lbl", x: left, y: y0 + 10}, g).textContent = def.label + (def.unit ? " (" + def.unit + ")" : "");
        var d = "", cls = def.cls || ("s" + (i + 1));
        points.forEach(function (p) {
          var v = p.values[def.key];
          if (typeof v !== "number" || !isFinite(v)) return;
          d += (d ? " L" : "M") + x(p.x).toFixed(1) + " " + y(v).toFixed(1);
        });
        if (d) svgEl("path", {"class": "line " + cls, d: d}, g);
        points.forEach(function (p) {
          var v = p.values[def.key];
          if (typeof v !== "number" || !isFinite(v)) return;
          svgEl("circle", {"class": "pt " + cls, cx: x(p.x).toFixed(1), cy: y(v).toFixed(1), r: 2.6,
                           "data-series": def.key, "data-step": p.step, "data-t": p.t, "data-value": v}, g);
        });
        panels.push({top: yTop, h: h});
        y0 += LABEL_H + h + gap;
      });
      var axis = svgEl("g", {"class": "axis"}, svg);
      var ticks = niceTicks(t0, t1, Math.max(2, Math.floor((width - left) / 70)))
        .filter(function (v) { return !opts.integerX || Math.abs(v - Math.round(v)) < 1e-9; });
      var xf = opts.xFmt || tickFmt(ticks);
      ticks.forEach(function (v) {
        svgEl("text", {x: x(v), y: y0 + 8, "text-anchor": "middle"}, axis).textContent = xf(v);
      });
      if (opts.xLabel) svgEl("text", {x: left - 6, y: y0 + 8, "text-anchor": "end", "class": "lbl"}, axis).textContent = opts.xLabel;
      markers.forEach(function (m, i) {
        var g = svgEl("g", {"class": "mark " + (m.severity || ""), "data-x": m.x, "data-code": m.label}, svg);
        svgEl("line", {x1: x(m.x), x2: x(m.x), y1: top, y2: y0 - gap}, g);
        var tx = svgEl("text", {x: x(m.x) + 3, y: top + 24 + 12 * (i % 3)}, g);
        tx.textContent = "⚑ " + m.label;
        svgEl("title", {}, g).textContent = m.label + (m.detail ? " — " + m.detail : "");
      });
      var cross = svgEl("line", {"class": "cross", y1: top, y2: y0 - gap, x1: 0, x2: 0, visibility: "hidden"}, svg);
      var tip = document.createElement("div");
      tip.className = "tip"; tip.hidden = true; tip.setAttribute("aria-hidden", "true");
      el.appendChild(tip);
      var current = -1;
      function show(i) {
        if (!points.length) return;
        current = Math.max(0, Math.min(points.length - 1, i));
        var p = points[current], px = x(p.x);
        cross.setAttribute("x1", px); cross.setAttribute("x2", px); cross.setAttribute("visibility", "visible");
        var lines = [(p.step !== undefined ? "step " + p.step : String(p.x)) + (p.t ? " · " + new Date(p.t * 1000).toLocaleString() : "")];
        defs.forEach(function (def) { lines.push(def.label + ": " + fmtNum(p.values[def.key])); });
        tip.textContent = "";
        lines.forEach(function (l, j) { var s = document.createElement("div"); s.textContent = l;
                                         if (j === 0) s.className = "muted-tip"; tip.appendChild(s); });
        tip.hidden = false;
        var scale = el.clientWidth / width || 1, tx = px * scale + 12;
        if (tx + 200 > el.clientWidth) tx = Math.max(0, px * scale - 210);
        tip.style.left = tx + "px"; tip.style.top = "8px";
        el.setAttribute("data-hover-step", p.step);
      }
      function nearest(clientX) {
        var rect = svg.getBoundingClientRect(), sx = (clientX - rect.left) * width / rect.width, best = -1, bd = Infinity;
        points.forEach(function (p, i) { var dd = Math.abs(x(p.x) - sx); if (dd < bd) { bd = dd; best = i; } });
        return best;
      }
      svg.addEventListener("pointermove", function (e) { var i = nearest(e.clientX); if (i >= 0) show(i); });
      svg.addEventListener("pointerdown", function (e) { var i = nearest(e.clientX); if (i >= 0) show(i); });
      svg.addEventListener("pointerleave", function (e) {
        if (e.pointerType === "touch") return;          // a tap ends with a leave: keep its values shown
        tip.hidden = true; cross.setAttribute("visibility", "hidden");
      });
      el.onkeydown = function (e) {
        if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
          show(current < 0 ? 0 : current + (e.key === "ArrowRight" ? 1 : -1)); e.preventDefault();
        } else if (e.key === "Home") { show(0); e.preventDefault(); }
        else if (e.key === "End") { show(points.length - 1); e.preventDefault(); }
        else if (e.key === "Escape") { tip.hidden = true; cross.setAttribute("visibility", "hidden"); }
      };
      el.onblur = function () { tip.hidden = true; cross.setAttribute("visibility", "hidden"); };
    }
    draw();
    var lastW = el.clientWidth;
    if (window.ResizeObserver) {
      new ResizeObserver(function () { if (Math.abs(el.clientWidth - lastW) > 4) { lastW = el.clientWidth; draw(); } })
        .observe(el);
    }
  }

  function bars(el, opts) {
    var items = opts.items || [];
    el.classList.add("chart");
    el.setAttribute("data-points", String(items.length));
    el.textContent = "";
    var width = Math.max(280, el.clientWidth || 600), height = 150, left = 56, bottom = 22, top = 6;
    var svg = svgEl("svg", {viewBox: "0 0 " + width + " " + height, width: width, height: height, role: "img",
                            "aria-label": opts.label || "bar chart", "data-unit": opts.unit || null}, el);
    var max = Math.max.apply(null, items.map(function (i) { return i.value; }).concat([0]));
    if (max <= 0) max = 1;
    var ticks = niceTicks(0, max, 3), hi = Math.max(max, ticks[ticks.length - 1]), tf = tickFmt(ticks);
    function y(v) { return top + (height - top - bottom) * (1 - v / hi); }
    var grid = svgEl("g", {"class": "grid axis"}, svg);
    ticks.forEach(function (v) {
      svgEl("line", {x1: left, x2: width, y1: y(v), y2: y(v)}, grid);
      svgEl("text", {x: left - 6, y: y(v) + 4, "text-anchor": "end"}, grid).textContent = (opts.prefix || "") + tf(v);
    });
    var g = svgEl("g", {"class": "bars"}, svg), w = Math.min(64, (width - left) / Math.max(items.length, 1));
    var tip = document.createElement("div");
    tip.className = "tip"; tip.hidden = true;
    el.appendChild(tip);
    items.forEach(function (it, i) {
      var r = svgEl("rect", {x: left + i * w + w * 0.15, width: Math.max(1, w * 0.7), y: y(it.value),
                             height: Math.max(0, y(0) - y(it.value)), "data-label": it.label, "data-value": it.value}, g);
      svgEl("title", {}, r).textContent = it.label + ": " + (it.text || it.value);
      r.addEventListener("pointerenter", function () {
        tip.textContent = it.label + ": " + (it.text || it.value); tip.hidden = false;
        var scale = el.clientWidth / width || 1;
        tip.style.left = Math.min(el.clientWidth - 160, (left + i * w) * scale) + "px"; tip.style.top = "0px";
      });
      r.addEventListener("pointerleave", function () { tip.hidden = true; });
      if (items.length <= 16 || i % Math.ceil(items.length / 8) === 0) {
        svgEl("text", {x: left + i * w + w / 2, y: height - 6, "text-anchor": "middle", "class": "lbl"}, svg)
          .textContent = it.short || it.label;
      }
    });
  }

  window.RftChart = {series: series, bars: bars, fmtNum: fmtNum};
})();
