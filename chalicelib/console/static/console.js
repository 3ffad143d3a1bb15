/* rft-hub console: plain JavaScript, no framework, no build step.
 *
 * Every piece of data comes from rft-hub's own API (same origin), authenticated by the HttpOnly
 * session cookie that POST /console/session sets; non-GET calls send X-CSRF-Token. The key typed
 * at sign-in is sent once and never stored. Text from the API (prompts, responses, names) is only
 * ever set as text, never parsed as HTML.
 */
(function () {
  "use strict";

  var BASE = document.querySelector("base").href;            // .../console/
  var API = new URL("../", BASE).href;                         // rft-hub's root (with a stage prefix, if any)
  var main = document.getElementById("main");
  var statusBox = document.getElementById("status");
  var S = {session: null, me: null};
  var renderSeq = 0;
  var ACTIVE = ["validating_files", "queued", "running"];
  var STATUSES = ["validating_files", "queued", "running", "succeeded", "failed", "cancelled"];

  // ---- small helpers ------------------------------------------------------------------------------

  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "class") el.className = v;
        else if (k === "text") el.textContent = v;
        else if (k.slice(0, 2) === "on") el.addEventListener(k.slice(2), v);
        else el.setAttribute(k, v === true ? "" : String(v));
      });
    }
    for (var i = 2; i < arguments.length; i++) add(el, arguments[i]);
    return el;
  }
  function add(el, c) {
    if (c === null || c === undefined || c === false) return;
    if (Array.isArray(c)) { c.forEach(function (x) { add(el, x); }); return; }
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }
  function link(path, text, attrs) { return h("a", Object.assign({href: path, "data-nav": true}, attrs || {}), text); }
  function enc(s) { return encodeURIComponent(s); }
  function badge(s) { return h("span", {"class": "badge " + String(s || "").replace(/[^a-z_]/gi, "")}, s || "–"); }
  function num(v, digits) {
    if (v === null || v === undefined || v === "" || isNaN(Number(v))) return "–";
    return Number(v).toFixed(digits === undefined ? 3 : digits);
  }
  function usd(v) {
    if (v === null || v === undefined || v === "") return "–";
    var n = Number(v);
    if (n === 0) return "$0.00";
    return isNaN(n) ? String(v) : "$" + (n < 0.01 && n > 0 ? n.toFixed(6) : n.toFixed(n < 10 ? 4 : 2));
  }
  function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "–"; }
  function day(ts) { return new Date(ts * 1000).toISOString().slice(0, 10); }
  function card(title, body, attrs) {
    return h("section", Object.assign({"class": "card", "aria-labelledby": null}, attrs || {}),
             title ? h("h2", null, title) : null, body);
  }
  function table(caption, headers, rows, attrs) {
    return h("div", {"class": "table-wrap"},
      h("table", attrs || null, caption ? h("caption", null, caption) : null,
        h("thead", null, h("tr", null, headers.map(function (c) {
          var hh = typeof c === "string" ? {label: c} : c;
          return h("th", {scope: "col", "class": hh.cls || null}, hh.label);
        }))),
        h("tbody", null, rows)));
  }
  function td(content, cls) { return h("td", cls ? {"class": cls} : null, content); }
  function kv(pairs) {
    return h("dl", {"class": "kv"}, pairs.filter(Boolean).map(function (p) { return [h("dt", null, p[0]), h("dd", null, p[1])]; }));
  }
  function empty(text) { return h("p", {"class": "muted"}, text); }
  function say(text, isError) {
    statusBox.textContent = text || "";
    statusBox.className = "status" + (isError ? " error" : "");
  }
  function errorText(err) { return err && err.message ? err.message : String(err); }

  // ---- the API --------------------------------------------------------------------------------------

  function api(path, opts) {
    opts = opts || {};
    var method = opts.method || "GET", headers = {"Accept": "application/json"};
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET" && S.session && S.session.csrf_token) headers["X-CSRF-Token"] = S.session.csrf_token;
    return fetch(API + path, {method: method, headers: headers, credentials: "same-origin", cache: "no-store",
                              body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined})
      .then(function (r) {
        return r.text().then(function (text) {
          var data = null;
          try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
          if (!r.ok) {
            var e = new Error(data && data.error ? data.error.message : "HTTP " + r.status);
            e.status = r.status; e.code = data && data.error ? data.error.code : null; e.body = data;
            if (r.status === 401 && !opts.quiet) signedOut("Your session ended: sign in again.");
            throw e;
          }
          return data;
        });
      });
  }
  /** A list route followed page by page (rft_next_cursor) up to `pages` pages. */
  function apiAll(path, pages) {
    var out = [], sep = path.indexOf("?") >= 0 ? "&" : "?";
    function page(after, n) {
      return api(path + (after ? sep + "after=" + enc(after) : "")).then(function (res) {
        out = out.concat(res.data || []);
        if (res.has_more && res.rft_next_cursor && n + 1 < (pages || 5)) return page(res.rft_next_cursor, n + 1);
        return {data: out, has_more: !!res.has_more};
      });
    }
    return page(null, 0);
  }
  /** An endpoint another part of rft-hub may not have yet: null when the route is unknown here. */
  function optional(promise) {
    return promise.catch(function (e) { if (e.status === 404 && e.code === "unknown_url") return null; throw e; });
  }

  // ---- session ------------------------------------------------------------------------------------

  function loadSession() {
    // Signed out is a 200 with signed_in: false (no failed request in the browser's console).
    return api("console/session", {quiet: true}).then(function (s) {
      S.session = s && s.signed_in !== false ? s : null; return S.session;
    }, function () { S.session = null; return null; });
  }
  function showChrome() {
    var signed = !!S.session;
    document.getElementById("nav").hidden = !signed;
    document.getElementById("who").hidden = !signed;
    document.getElementById("nav-admin").hidden = !(signed && S.session.principal === "admin");
    if (signed) {
      document.getElementById("who-name").textContent = S.session.principal === "admin" ? "admin"
        : (S.me && S.me.team ? S.me.team.name + " (" + S.me.team.id + ")" : S.session.team_id);
    }
  }
  function signedOut(message) {
    S.session = null; S.me = null;
    showChrome();
    signInPage(message);
  }
  function signInPage(message) {
    document.title = "Sign in · rft-hub console";
    var input = h("input", {type: "password", id: "key", name: "key", autocomplete: "off", required: true,
                            spellcheck: "false", "aria-describedby": "key-help"});
    var msg = h("p", {"class": "msg error", role: "alert"}, message && message.indexOf("ended") < 0 ? message : null);
    var form = h("form", {"class": "card signin", "aria-labelledby": "signin-title"},
      h("h1", {id: "signin-title"}, "Sign in to rft-hub"),
      h("label", {"for": "key"}, "API key (a team key, or the admin key)"), input,
      h("p", {id: "key-help", "class": "small muted"},
        "The key is exchanged for a session cookie and is not kept in this browser."),
      msg, h("button", {"class": "btn", type: "submit"}, "Sign in"));
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var key = input.value.trim();
      input.value = "";
      api("console/session", {method: "POST", body: {key: key}, quiet: true}).then(function (s) {
        S.session = s;
        return afterSignIn();
      }).then(function () {
        var here = pagePath();
        navigate(here.length ? location.pathname + location.search : BASE + (S.session.principal === "admin" ? "spend" : "jobs"), true);
      }).catch(function (err) { msg.textContent = errorText(err); input.focus(); });
    });
    clear(main).appendChild(form);
    if (message && message.indexOf("ended") >= 0) say(message, true);
    input.focus();
  }
  function afterSignIn() {
    if (S.session && S.session.principal === "team") {
      return api("v1/me").then(function (me) { S.me = me; showChrome(); }, function () { showChrome(); });
    }
    showChrome();
    return Promise.resolve();
  }
  document.getElementById("sign-out").addEventListener("click", function () {
    api("console/session", {method: "DELETE", quiet: true}).catch(function () { return null; }).then(function () {
      say("Signed out.");
      signedOut();
      history.replaceState(null, "", BASE);
    });
  });

  // ---- routing -------------------------------------------------------------------------------------

  function pagePath() {
    var basePath = new URL(BASE).pathname, path = location.pathname;
    var rel = path.indexOf(basePath) === 0 ? path.slice(basePath.length) : "";
    return rel.split("/").filter(Boolean).map(decodeURIComponent);
  }
  function navigate(url, replace) {
    if (replace) history.replaceState(null, "", url); else history.pushState(null, "", url);
    render();
  }
  document.addEventListener("click", function (e) {
    var a = e.target.closest && e.target.closest("a[href]");
    if (!a || a.hasAttribute("download") || a.target || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey) return;
    if (a.href.indexOf(BASE) !== 0 && a.href + "/" !== BASE) return;
    e.preventDefault();
    navigate(a.href);
  });
  window.addEventListener("popstate", render);

  function render() {
    var seq = ++renderSeq;
    say("");
    if (!S.session) { signInPage(); return; }
    var parts = pagePath(), page = parts[0] || (S.session.principal === "admin" ? "spend" : "jobs");
    Array.prototype.forEach.call(document.querySelectorAll("#nav a"), function (a) {
      if (a.getAttribute("data-page") === page) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    });
    var view = {seq: seq, alive: function () { return seq === renderSeq; }};
    clear(main).appendChild(h("p", {"class": "muted"}, "Loading…"));
    var pages = {jobs: parts[1] ? function () { return jobPage(view, parts[1]); } : function () { return jobsPage(view); },
                 models: function () { return modelsPage(view); },
                 evals: parts[1] ? (parts[2] === "runs" && parts[3] ? function () { return runPage(view, parts[1], parts[3]); }
                                                                     : function () { return evalPage(view, parts[1]); })
                                 : function () { return evalsPage(view); },
                 pipelines: parts[1] ? (parts[2] === "runs" && parts[3] ? function () { return pipelinePages().run(view, parts[1], parts[3]); }
                                                                         : function () { return pipelinePages().pipeline(view, parts[1]); })
                                     : function () { return pipelinePages().list(view); },
                 spend: function () { return spendPage(view); },
                 admin: function () { return adminPage(view); }};
    var fn = pages[page];
    if (!fn) { show(view, "Not found", empty("No such console page.")); return; }
    if (S.session.principal === "admin" && ["jobs", "models", "evals", "pipelines"].indexOf(page) >= 0) {
      show(view, page.charAt(0).toUpperCase() + page.slice(1),
           empty("The admin key has no team: jobs, models, evals and pipelines belong to teams. Sign in with a team key to see " +
                 "them; Spend and Admin show every team."));
      return;
    }
    Promise.resolve().then(fn).catch(function (err) {
      if (!view.alive() || err.status === 401) return;
      show(view, "Error", h("p", {"class": "msg error", role: "alert"}, errorText(err)));
    });
  }
  /** Replaces the page (if this render is still the current one), titles it and moves focus to it. */
  function show(view, title, content) {
    if (!view.alive()) return false;
    document.title = title + " · rft-hub console";
    clear(main);
    add(main, [h("h1", {id: "page-title"}, title), content]);
    main.focus({preventScroll: true});
    return true;
  }

  // ---- jobs -----------------------------------------------------------------------------------------

  function graderType(job) {
    var g = job.method && job.method.reinforcement && job.method.reinforcement.grader;
    if (!g) return "–";
    if (g.type === "multi") {
      var inner = g.graders && typeof g.graders === "object" ? Object.keys(g.graders).map(function (k) {
        return g.graders[k] && g.graders[k].type; }) : [];
      return "multi" + (inner.length ? " (" + inner.join(", ") + ")" : "");
    }
    return g.type === "saved" ? "saved " + (g.id || "") : g.type;
  }
  function rewardOf(e) {
    return e.type === "metrics" && e.data && typeof e.data.critic_rewards_mean === "number" ? e.data.critic_rewards_mean : null;
  }
  function findingsOf(events) {
    return events.filter(function (e) { return e.data && e.data.code && e.data.severity && e.type !== "metrics"; });
  }

  function jobsPage(view) {
    var params = new URLSearchParams(location.search);
    var jobs = [], cursor = null, hasMore = false, settled = {}, best = {}, watch = {};
    var statusSel = h("select", {id: "f-status"}, h("option", {value: ""}, "any status"),
                      STATUSES.map(function (s) { return h("option", {value: s}, s); }));
    var modelSel = h("select", {id: "f-model"}, h("option", {value: ""}, "any model"));
    statusSel.value = params.get("status") || "";
    var modelWanted = params.get("model") || "";
    var tbody = h("tbody"), more = h("button", {"class": "btn secondary", type: "button", hidden: true}, "Load more");
    var count = h("p", {"class": "small muted", "aria-live": "polite"});
    function filtersChanged() {
      modelWanted = modelSel.value;
      var q = new URLSearchParams();
      if (statusSel.value) q.set("status", statusSel.value);
      if (modelSel.value) q.set("model", modelSel.value);
      history.replaceState(null, "", BASE + "jobs" + (q.toString() ? "?" + q : ""));
      draw();
    }
    statusSel.addEventListener("change", filtersChanged);
    modelSel.addEventListener("change", filtersChanged);
    function draw() {
      var models = {};
      jobs.forEach(function (j) { models[j.model] = true; });
      var want = modelWanted;
      clear(modelSel).appendChild(h("option", {value: ""}, "any model"));
      Object.keys(models).sort().forEach(function (m) { modelSel.appendChild(h("option", {value: m}, m)); });
      if (want && models[want]) modelSel.value = want;
      var shown = jobs.filter(function (j) {
        return (!statusSel.value || j.status === statusSel.value) && (!modelSel.value || j.model === modelSel.value);
      });
      clear(tbody);
      shown.forEach(function (j) {
        var est = j.rft_cost_estimate && j.rft_cost_estimate.estimated_usd, st = settled[j.id];
        var w = watch[j.id];
        tbody.appendChild(h("tr", {"data-job": j.id},
          td([link("jobs/" + enc(j.id), j.user_provided_suffix || j.id), h("div", {"class": "small muted mono"}, j.id)]),
          td(badge(j.status)), td(j.model, "hide-sm"), td(graderType(j), "hide-sm"),
          td(best[j.id] === undefined ? "…" : num(best[j.id]), "num"),
          td([usd(est), h("span", {"class": "muted"}, " / "), st && st.settled_usd !== null ? usd(st.settled_usd) : "–"], "num"),
          td(w === undefined ? "…" : w.length ? w.map(function (f) {
            return h("span", {"class": "badge " + (f.data.severity === "critical" ? "critical" : "warning"),
                              title: f.message}, f.data.code); }) : "none"),
          td(when(j.created_at), "hide-sm small")));
      });
      count.textContent = shown.length + " of " + jobs.length + " loaded job(s)" + (hasMore ? "; more on the server" : "");
      more.hidden = !hasMore;
    }
    function enrich(batch) {
      // Settled cost: the usage report's training list (from the oldest job's day); best reward and
      // watch findings: the registered model, else the job's newest events.
      if (!batch.length) return Promise.resolve();
      var oldest = Math.min.apply(null, batch.map(function (j) { return j.created_at; }));
      var usage = api("v1/usage?group_by=kind&start=" + day(oldest)).then(function (u) {
        (u.training || []).forEach(function (t) { settled[t.job_id] = t; });
      }).catch(function () { return null; });
      var models = api("v1/models").then(function (m) {
        (m.data || []).forEach(function (x) { if (x.rft_kind === "tuned" && x.rft_job_id) best[x.rft_job_id] = x.rft_best_reward; });
      }).catch(function () { return null; });
      return Promise.all([usage, models]).then(function () {
        if (!view.alive()) return;
        draw();
        var queue = batch.slice(0, 40);
        function next() {
          var j = queue.shift();
          if (!j || !view.alive()) return Promise.resolve();
          return api("v1/fine_tuning/jobs/" + enc(j.id) + "/events?limit=200").then(function (ev) {
            var events = ev.data || [];
            if (best[j.id] === undefined || best[j.id] === null) {
              var rs = events.map(rewardOf).filter(function (r) { return r !== null; });
              best[j.id] = rs.length ? Math.max.apply(null, rs) : null;
            }
            watch[j.id] = findingsOf(events);
          }).catch(function () { watch[j.id] = []; }).then(function () { if (view.alive()) draw(); return next(); });
        }
        return Promise.all([next(), next(), next()]);
      });
    }
    function load() {
      more.disabled = true;
      return api("v1/fine_tuning/jobs?limit=50" + (cursor ? "&after=" + enc(cursor) : "")).then(function (res) {
        var batch = res.data || [];
        jobs = jobs.concat(batch);
        hasMore = !!res.has_more; cursor = res.rft_next_cursor;
        more.disabled = false;
        draw();
        return enrich(batch);
      });
    }
    more.addEventListener("click", function () { load().catch(function (e) { say(errorText(e), true); }); });
    return load().then(function () {
      show(view, "Jobs", [
        h("div", {"class": "filters", role: "search"},
          h("label", {"for": "f-status"}, "Status", statusSel), h("label", {"for": "f-model"}, "Base model", modelSel)),
        jobs.length ? h("div", {"class": "table-wrap"}, h("table", {id: "jobs-table"},
          h("caption", null, "The team's fine-tuning jobs, newest first. Cost: estimated / settled."),
          h("thead", null, h("tr", null, ["Job", "Status", {label: "Base model", cls: "hide-sm"},
            {label: "Grader", cls: "hide-sm"}, {label: "Best reward", cls: "num"}, {label: "Cost", cls: "num"},
            "Watch", {label: "Created", cls: "hide-sm"}].map(function (c) {
              return typeof c === "string" ? h("th", {scope: "col"}, c) : h("th", {scope: "col", "class": c.cls}, c.label);
            }))), tbody))
          : empty("No jobs yet. Start one with the openai SDK: client.fine_tuning.jobs.create(...) (README, quickstart)."),
        count, more]);
      draw();
    });
  }

  // ---- one job --------------------------------------------------------------------------------------

  function jobPage(view, jobId) {
    var base = "v1/fine_tuning/jobs/" + enc(jobId);
    return api(base).then(function (job) {
      return Promise.all([
        apiAll(base + "/events?limit=1000", 5),
        apiAll(base + "/checkpoints?limit=100", 3).catch(function () { return {data: []}; }),
        optional(api(base + "/watch?limit=200")).catch(function () { return null; }),
        api("v1/usage?group_by=kind&start=" + day(job.created_at)).catch(function () { return null; }),
      ]).then(function (r) { drawJob(view, job, r[0].data, r[1].data, r[2], r[3]); });
    });
  }

  function metricsPoints(events) {
    var byStep = {};
    events.forEach(function (e) {
      if (e.type !== "metrics" || !e.data || typeof e.data.step !== "number") return;
      var prev = byStep[e.data.step];
      if (!prev || e.created_at < prev.t) {
        byStep[e.data.step] = {x: e.data.step, step: e.data.step, t: e.created_at, values: {
          reward: e.data.critic_rewards_mean, length: e.data.response_length_mean, entropy: e.data.actor_entropy}};
      }
    });
    return Object.keys(byStep).map(function (k) { return byStep[k]; }).sort(function (a, b) { return a.step - b.step; });
  }

  function findingMarkers(points, watchView, events) {
    var findings = watchView && watchView.findings ? watchView.findings.map(function (f) {
      return {code: f.code, severity: f.severity, title: f.title, message: f.message, window: f.window, t: f.created_at};
    }) : findingsOf(events).map(function (e) {
      return {code: e.data.code, severity: e.data.severity, title: e.message, message: e.message, window: e.data.window,
              t: e.created_at};
    });
    var aligned = {};
    (watchView && watchView.data || []).forEach(function (w) { if (w.bedrock_step !== null && w.bedrock_step !== undefined) aligned[w.window] = w.bedrock_step; });
    return findings.map(function (f) {
      // Where it happened: the Bedrock step its window is aligned with, else the last step
      // recorded by the time it was raised, else its window number.
      var step = aligned[f.window];
      if (step === undefined) {
        var before = points.filter(function (p) { return p.t <= f.t; });
        step = before.length ? before[before.length - 1].step : (points.length ? points[0].step : f.window);
      }
      return {x: step, label: f.code, severity: f.severity, detail: f.title, finding: f};
    });
  }

  function drawJob(view, job, events, checkpoints, watchView, usage) {
    var points = metricsPoints(events), markers = findingMarkers(points, watchView, events);
    var messages = events.filter(function (e) { return e.type !== "metrics"; })
      .sort(function (a, b) { return a.created_at - b.created_at; });
    var title = [job.user_provided_suffix || job.id, " ", badge(job.status)];
    var msg = h("p", {"class": "msg", role: "status"});
    var actions = h("div", {"class": "row"});
    if (ACTIVE.indexOf(job.status) >= 0) {
      actions.appendChild(h("button", {"class": "btn secondary", type: "button", id: "refresh-job", onclick: render}, "Refresh"));
      actions.appendChild(h("button", {"class": "btn danger", type: "button", id: "cancel-job", onclick: function (e) {
        if (!window.confirm("Cancel job " + job.id + "? Bedrock stops it; the budget hold is released.")) return;
        e.target.disabled = true;
        api(base(job) + "/cancel", {method: "POST"}).then(function () { msg.className = "msg ok"; msg.textContent = "Cancelled.";
          render(); }).catch(function (err) { e.target.disabled = false; msg.className = "msg error"; msg.textContent = errorText(err); });
      }}, "Cancel job"));
    }
    var training = usage && (usage.training || []).filter(function (t) { return t.job_id === job.id; })[0];
    var est = job.rft_cost_estimate || {};
    var hp = job.hyperparameters || {};

    var overview = card("Overview", kv([
      ["Job", h("span", {"class": "mono"}, job.id)],
      ["Base model", job.model],
      ["Tuned model", job.fine_tuned_model ? link("models#" + enc(job.fine_tuned_model), job.fine_tuned_model, {"class": "mono"}) : "–"],
      ["Grader", graderType(job)],
      ["Hyperparameters", "n_epochs " + hp.n_epochs + " · batch_size " + hp.batch_size + " · lr × " + hp.learning_rate_multiplier],
      ["Training file", h("span", {"class": "mono"}, job.training_file)],
      ["Created", when(job.created_at)], ["Finished", when(job.finished_at)],
      ["Submission", job.rft_submission || "–"],
      job.error ? ["Error", h("span", {"class": "msg error"}, (job.error.code || "") + ": " + job.error.message)] : null]));
    var cost = card("Cost", kv([
      ["Estimated", usd(est.estimated_usd)],
      est.judge ? ["Judge calls (est.)", usd(est.judge.estimated_usd)] : null,
      ["Settled", training && training.settled_usd !== null ? usd(training.settled_usd) :
        (ACTIVE.indexOf(job.status) >= 0 ? "held until the job ends" : "–")],
      training ? ["Judge spent", usd(training.judge_spent_usd)] : null,
      ["Basis", (est.rows || "?") + " rows × " + (est.n_epochs || "?") + " epochs × " + (est.samples_per_prompt || "?") +
        " samples × (" + (est.avg_prompt_tokens || "?") + " prompt + " + (est.response_tokens || "?") + " response tokens)"],
      est.rates ? ["Rates (per 1M)", "in $" + est.rates.input_usd_per_1m + " · out $" + est.rates.output_usd_per_1m +
        (est.rates.indicative ? " (indicative)" : "")] : null,
      est.note ? ["Note", h("span", {"class": "small muted"}, est.note)] : null]), {id: "cost"});
    var path = (job.rft_status_path || []);
    var statusCard = card("Status", [
      h("ol", {"class": "path", "aria-label": "Status path"}, path.map(function (s) { return h("li", null, badge(s)); })),
      h("h3", null, "Timeline"),
      messages.length ? h("ol", {"class": "timeline"}, messages.map(function (e) {
        return h("li", {"class": e.level}, h("time", {datetime: new Date(e.created_at * 1000).toISOString()}, when(e.created_at)),
                 e.level !== "info" ? [badge(e.level), " "] : null, e.message,
                 e.rft_source ? h("span", {"class": "small muted"}, " · " + e.rft_source) : null);
      })) : empty("No events yet.")], {id: "timeline"});

    // The reward curve, response length and entropy on one step axis, findings marked.
    var chartEl = h("div", {id: "reward-chart", "aria-describedby": "reward-chart-help"});
    var dataTable = h("table", {"class": "sr-only", id: "reward-data"},
      h("caption", null, "Training metrics by step"),
      h("thead", null, h("tr", null, ["Step", "Time", "Reward (critic_rewards_mean)", "Response length", "Entropy"]
        .map(function (c) { return h("th", {scope: "col"}, c); }))),
      h("tbody", null, points.map(function (p) {
        return h("tr", {"data-step": p.step}, td(p.step), td(when(p.t)), td(p.values.reward), td(p.values.length), td(p.values.entropy));
      })));
    var curve = card("Reward curve", points.length ? [
      h("div", {"class": "legend"}, h("span", null, h("i", {"class": "s1"}), "reward (critic_rewards_mean)"),
        h("span", null, h("i", {"class": "s2"}), "response length (mean)"), h("span", null, h("i", {"class": "s3"}), "entropy"),
        markers.length ? h("span", null, "⚑ training watch finding") : null),
      chartEl, dataTable,
      h("p", {id: "reward-chart-help", "class": "small muted"}, points.length + " steps. Hover, tap or use the arrow keys " +
        "on the chart for the values at a step; the same data is in a table for screen readers.")]
      : empty(ACTIVE.indexOf(job.status) >= 0 ? "No metrics yet: the curve appears with the first training step."
                                              : "This job recorded no training metrics."), {id: "curve"});

    var watchCard = card("Training watch", watchView === null ? empty("This rft-hub has no training watch endpoint.")
      : markers.length ? h("ul", null, markers.map(function (m) {
          var f = m.finding;
          return h("li", null, badge(f.severity), " ", h("strong", null, f.code), " at step " + m.x + " (window " + f.window + "): ",
                   f.title ? f.title + ". " : "", h("span", {"class": "small muted"}, f.message || ""));
        })) : empty("No findings."), {id: "watch"});

    var ckCard = card("Checkpoints", checkpoints.length ? table(null, ["Step", "Model", "Metrics", {label: "Created", cls: "hide-sm"}],
      checkpoints.map(function (c) {
        return h("tr", null, td(c.step_number, "num"), td(h("span", {"class": "mono"}, c.fine_tuned_model_checkpoint)),
          td(Object.keys(c.metrics || {}).filter(function (k) { return k !== "step"; }).map(function (k) {
            return k + " " + num(c.metrics[k]); }).join(" · ")), td(when(c.created_at), "hide-sm small"));
      })) : empty("No checkpoints yet."), {id: "checkpoints"});

    var pf = job.rft_preflight;
    var preflight = card("Preflight", !pf ? empty("No preflight report (the grader's preflight runs before submission).") : [
      h("p", null, pf.passed === false ? badge("failed") : badge("passed"), " ",
        pf.grader ? "grader " + (pf.grader.name || pf.grader.type) + " · " : "",
        pf.rows_used !== undefined ? pf.rows_used + " rows sampled" : ""),
      (pf.findings || []).length ? h("ul", null, pf.findings.map(function (f) {
        return h("li", null, badge(f.severity), " ", h("strong", null, f.code), ": ", f.message);
      })) : empty("No findings."),
      pf.probes ? table("Probe rewards (mean over the sampled rows)", ["Probe", {label: "Mean", cls: "num"},
        {label: "Min", cls: "num hide-sm"}, {label: "Max", cls: "num hide-sm"}, {label: "Errors", cls: "num"}],
        Object.keys(pf.probes).map(function (k) {
          var p = pf.probes[k] || {};
          return h("tr", null, td(k), td(num(p.mean), "num"), td(num(p.min), "num hide-sm"), td(num(p.max), "num hide-sm"),
                   td(p.errors, "num"));
        })) : null], {id: "preflight"});

    var rollouts = card("Rollouts", h("p", {"class": "muted"}, "Loading…"), {id: "rollouts"});

    var ok = show(view, "", null);
    if (!ok) return;
    document.title = (job.user_provided_suffix || job.id) + " · rft-hub console";
    var h1 = main.querySelector("h1");
    add(h1, title);
    add(main, [h("p", {"class": "small muted"}, link("jobs", "← all jobs")), actions, msg, curve, watchCard, rollouts,
               h("div", {"class": "grid"}, overview, cost), statusCard, ckCard, preflight]);
    if (points.length) {
      window.RftChart.series(chartEl, {points: points, markers: markers, label: "Reward, response length and entropy by training step",
        xLabel: "step", integerX: true, series: [{key: "reward", label: "reward", unit: "mean grader score", minSpan: 0.2},
                                 {key: "length", label: "response length", unit: "tokens", minSpan: 20, floor: 0},
                                 {key: "entropy", label: "entropy", unit: "per token", minSpan: 0.1, floor: 0}]});
    }
    rolloutsBrowser(view, job, watchView, rollouts);
  }
  function base(job) { return "v1/fine_tuning/jobs/" + enc(job.id); }

  function rolloutsBrowser(view, job, watchView, container) {
    var order = "reward_desc", windowNo = null, cursor = null;
    var body = h("div"), list = h("div", {id: "rollout-list"}), more = h("button", {"class": "btn secondary", type: "button", hidden: true}, "More");
    var windowSel = h("select", {id: "rollout-window"});
    var tabs = h("div", {"class": "tabs", role: "group", "aria-label": "Which rollouts"}, [["reward_desc", "Best"],
      ["reward_asc", "Worst"], ["random", "Random"]].map(function (o) {
        return h("button", {type: "button", "data-order": o[0], "aria-pressed": String(o[0] === order), onclick: function (e) {
          order = o[0];
          Array.prototype.forEach.call(tabs.children, function (b) { b.setAttribute("aria-pressed", String(b === e.target)); });
          load(true);
        }}, o[1]);
      }));
    windowSel.addEventListener("change", function () { windowNo = Number(windowSel.value); load(true); });
    function item(r) {
      var errs = (r.errors || []).length ? r.errors.join(", ") : null;
      return h("details", {"class": "rollout", "data-rollout": r.id, "data-reward": r.reward},
        h("summary", null, h("strong", null, "reward " + num(r.reward)), h("span", null, "length " + r.response_length),
          errs ? h("span", {"class": "msg error"}, "errors: " + errs) : null,
          r.degenerate ? badge("degenerate") : null,
          r.audit_score !== null && r.audit_score !== undefined ? h("span", null, "audit " + num(r.audit_score)) : null,
          h("span", {"class": "small muted mono"}, r.prompt_key || r.sample_id)),
        h("h3", null, "Prompt"), h("pre", null, r.prompt === null || r.prompt === undefined ? "(text not kept)" : r.prompt),
        h("h3", null, "Reference answer"), h("pre", null, typeof r.reference_answer === "string" ? r.reference_answer
                                                          : JSON.stringify(r.reference_answer, null, 2)),
        h("h3", null, "Response"), h("pre", {"class": "response"}, r.response === null || r.response === undefined ? "(text not kept)"
                                                                  : r.response + (r.truncated ? "\n[truncated]" : "")),
        kv([["Sample", h("span", {"class": "mono"}, r.sample_id)], ["Window · invocation", r.window + " · " + r.invocation],
            ["Kept as", r.kept], ["Fingerprint", h("span", {"class": "mono"}, r.fingerprint)], ["Recorded", when(r.created_at)]]));
    }
    function load(reset) {
      if (reset) { cursor = null; clear(list); }
      var q = "?limit=10&order=" + order + (windowNo ? "&window=" + windowNo : "") + (cursor ? "&after=" + enc(cursor) : "");
      return optional(api(base(job) + "/rollouts" + q)).then(function (res) {
        if (!view.alive()) return;
        if (res === null) { clear(container); add(container, [h("h2", null, "Rollouts"), empty("This rft-hub has no rollouts endpoint.")]); return; }
        if (!windowSel.options.length && res.window) {
          var windows = {};
          (watchView && watchView.data || []).forEach(function (w) { windows[w.window] = true; });
          for (var i = 1; i <= res.window; i++) windows[i] = true;
          Object.keys(windows).map(Number).sort(function (a, b) { return b - a; }).forEach(function (w) {
            windowSel.appendChild(h("option", {value: w}, "window " + w + (w === res.window ? " (latest)" : "")));
          });
          windowSel.value = String(res.window);
          windowNo = res.window;
        }
        (res.data || []).forEach(function (r) { list.appendChild(item(r)); });
        if (!list.children.length) list.appendChild(empty(res.window ? "No rollouts kept in this window." :
                                                          "No rollouts recorded yet (they appear as the grader scores samples)."));
        cursor = res.rft_next_cursor; more.hidden = !res.has_more;
      }).catch(function (err) { list.appendChild(h("p", {"class": "msg error"}, errorText(err))); });
    }
    more.addEventListener("click", function () { load(false); });
    clear(container);
    add(container, [h("h2", null, "Rollouts"), h("div", {"class": "filters"}, h("label", {"for": "rollout-window"}, "Window", windowSel), tabs),
                    h("p", {"class": "small muted"}, "The samples the grader scored, with their full text: the best and worst " +
                      "of a window by reward, or a random sample of it."), body]);
    add(body, [list, more]);
    return load(true);
  }

  // ---- models ---------------------------------------------------------------------------------------

  function modelsPage(view) {
    return Promise.all([api("v1/models"), api("v1/models/aliases")]).then(function (r) {
      var all = r[0].data || [], aliases = r[1].data || [];
      var tuned = all.filter(function (m) { return m.rft_kind === "tuned"; });
      var deployments = all.filter(function (m) {
        return ["base", "tuned", "alias", "checkpoint"].indexOf(m.rft_kind) < 0 ||
          Object.keys(m).some(function (k) { return k.indexOf("rft_deployment") === 0; });
      });
      var targets = [];
      tuned.forEach(function (m) {
        targets.push({id: m.id, label: m.id + " (final)"});
        (m.rft_checkpoints || []).slice().sort(function (a, b) { return b.step - a.step; }).forEach(function (c) {
          targets.push({id: c.model, label: c.model + " (step " + c.step + ")"});
        });
      });
      var msg = h("div", {"class": "msg", role: "status", id: "alias-msg"});
      var aliasIn = h("input", {type: "text", id: "alias-name", list: "alias-names", required: true, pattern: "[a-z0-9][a-z0-9\\-]{0,63}",   // registry.ALIAS_RE; "-" escaped: browsers compile patterns with the v flag
                                autocomplete: "off"});
      var modelSel = h("select", {id: "alias-model", required: true}, targets.map(function (t) { return h("option", {value: t.id}, t.label); }));
      function point(alias, model, button) {
        if (button) button.disabled = true;
        msg.className = "msg"; msg.textContent = "Moving " + alias + " …";
        return api("v1/models/aliases", {method: "POST", body: {alias: alias, model: model}}).then(function (res) {
          var ev = res.rft_evidence;
          return modelsPage(view).then(function () {
            var m = document.getElementById("alias-msg");
            m.className = "msg ok";
            m.textContent = "Alias " + res.id + " now points at " + res.rft_target + " (version " + res.rft_version + ")" +
              (ev && ev.eval_run_id ? ", justified by eval run " + ev.eval_run_id + "." : ".");
          });
        }).catch(function (err) {
          if (button) button.disabled = false;
          msg.className = "msg error";
          msg.textContent = (err.code === "gate_failed" ? "Refused by the alias's gate: " : "") + errorText(err);
        });
      }
      var form = h("form", {"class": "inline", id: "promote-form"},
        h("label", {"for": "alias-name"}, "Alias", aliasIn),
        h("datalist", {id: "alias-names"}, aliases.map(function (a) { return h("option", {value: a.id}); })),
        h("label", {"for": "alias-model"}, "Model or checkpoint", modelSel),
        h("button", {"class": "btn", type: "submit"}, "Point alias"));
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        point(aliasIn.value.trim(), modelSel.value, form.querySelector("button"));
      });

      var aliasRows = aliases.map(function (a) {
        var hist = h("div", {"class": "history", id: "history-" + a.id, hidden: true});
        var btn = h("button", {"class": "btn secondary", type: "button", "aria-expanded": "false",
                               "aria-controls": "history-" + a.id, onclick: function () {
          var open = btn.getAttribute("aria-expanded") === "true";
          btn.setAttribute("aria-expanded", String(!open));
          hist.hidden = open;
          if (!open && !hist.children.length) loadHistory(a, hist);
        }}, "History");
        return [h("tr", {"data-alias": a.id}, td(h("strong", null, a.id)), td(h("span", {"class": "mono"}, a.rft_target)),
                  td(a.rft_version, "num"), td(a.rft_base_model, "hide-sm"), td(when(a.created), "hide-sm small"), td(btn)),
                h("tr", {"class": "history-row"}, h("td", {colspan: 6}, hist))];
      });
      function loadHistory(a, into) {
        add(into, empty("Loading…"));
        api("v1/models/aliases/" + enc(a.id) + "/history").then(function (res) {
          clear(into);
          into.appendChild(table("History of " + a.id + " (newest first)", ["Version", "Model", "Who", "When", "Justified by", ""],
            (res.data || []).map(function (c) {
              var why = c.override_reason ? "admin override: " + c.override_reason
                : c.eval_run_id ? [link("evals/" + enc(c.eval_id) + "/runs/" + enc(c.eval_run_id), "eval run " + c.eval_run_id),
                                   c.baseline_run_id ? " (vs " + c.baseline_run_id + ")" : ""]
                : c.version === 1 ? "first point (the job's suffix)" : "–";
              var back = c.model !== a.rft_target ? h("button", {"class": "btn secondary", type: "button",
                "data-rollback": c.version, onclick: function (e) {
                  if (window.confirm("Point " + a.id + " back at " + c.model + "? (a new version; gates apply)")) point(a.id, c.model, e.target);
                }}, "Roll back to this") : h("span", {"class": "small muted"}, "current");
              return h("tr", null, td(c.version, "num"), td(h("span", {"class": "mono"}, c.model)), td(c.changed_by),
                       td(when(c.changed_at), "small"), td(why), td(back));
            }), {"class": "history-table"}));
        }).catch(function (err) { clear(into).appendChild(h("p", {"class": "msg error"}, errorText(err))); });
      }

      show(view, "Models", [
        card("Aliases", [
          h("p", {"class": "small muted"}, "Promote: point an alias at a tuned model or checkpoint. A gated alias moves only " +
            "to a model whose run of the gate's eval passes (the admin may override through the API)."),
          form, msg,
          aliases.length ? h("div", {"class": "table-wrap"}, h("table", {id: "aliases-table"},
            h("caption", null, "The team's aliases"),
            h("thead", null, h("tr", null, ["Alias", "Target", {label: "Version", cls: "num"}, {label: "Base", cls: "hide-sm"},
              {label: "Updated", cls: "hide-sm"}, ""].map(function (c) {
                return typeof c === "string" ? h("th", {scope: "col"}, c) : h("th", {scope: "col", "class": c.cls}, c.label); }))),
            h("tbody", null, aliasRows))) : empty("No aliases yet: a succeeded job's suffix becomes one.")], {id: "aliases"}),
        card("Tuned models", tuned.length ? table(null, ["Model", {label: "Base", cls: "hide-sm"}, "Job",
          {label: "Final reward", cls: "num"}, {label: "Best reward", cls: "num"}, {label: "Checkpoints", cls: "num"}],
          tuned.map(function (m) {
            return h("tr", {id: m.id}, td(h("span", {"class": "mono"}, m.id)), td(m.rft_base_model, "hide-sm"),
              td(m.rft_job_id ? link("jobs/" + enc(m.rft_job_id), m.rft_job_id) : "–"), td(num(m.rft_final_reward), "num"),
              td(num(m.rft_best_reward), "num"), td((m.rft_checkpoints || []).length, "num"));
          })) : empty("No tuned models yet."), {id: "tuned"}),
        card("Amazon Nova deployments", deployments.length ? table(null, ["Deployment", "Kind", "State"], deployments.map(function (m) {
          return h("tr", null, td(h("span", {"class": "mono"}, m.id)), td(m.rft_kind), td(m.rft_deployment_status || m.rft_deployment_state || "–"));
        })) : empty("No Nova deployments: this rft-hub's /v1/models lists none (Nova support is not available here yet)."),
             {id: "deployments"})]);
      if (location.hash) {
        var target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
        if (target) { target.classList.add("sel"); target.scrollIntoView({block: "center"}); }
      }
    });
  }

  // ---- evals ----------------------------------------------------------------------------------------

  function evalsPage(view) {
    return optional(apiAll("v1/evals?limit=100", 3)).then(function (res) {
      if (res === null) { show(view, "Evals", empty("This rft-hub has no evals API yet.")); return; }
      var evals = res.data;
      show(view, "Evals", evals.length ? table("The team's evals, newest first", ["Eval", "Testing criteria", {label: "Created", cls: "hide-sm"}],
        evals.map(function (e) {
          return h("tr", null, td([link("evals/" + enc(e.id), e.name || e.id), h("div", {"class": "small muted mono"}, e.id)]),
            td((e.testing_criteria || []).map(function (c) { return c.name + " (" + c.type + ")"; }).join(", ")),
            td(when(e.created_at), "hide-sm small"));
        })) : empty("No evals yet. Create one with client.evals.create(...)."));
    });
  }

  function counts(rc) { rc = rc || {}; return (rc.passed || 0) + " passed · " + (rc.failed || 0) + " failed · " + (rc.errored || 0) + " errored / " + (rc.total || 0); }

  function evalPage(view, evalId) {
    return Promise.all([api("v1/evals/" + enc(evalId)), apiAll("v1/evals/" + enc(evalId) + "/runs?limit=100", 3)]).then(function (r) {
      var ev = r[0], runs = r[1].data, picked = [];
      var cmp = h("div", {id: "comparison"}), go = h("button", {"class": "btn", type: "button", id: "compare-runs", disabled: true}, "Compare the two selected runs");
      var rows = runs.map(function (run) {
        var box = h("input", {type: "checkbox", "aria-label": "Select run " + run.id + " for comparison", value: run.id});
        box.addEventListener("change", function () {
          if (box.checked) picked.push(run.id); else picked = picked.filter(function (x) { return x !== run.id; });
          while (picked.length > 2) {
            var drop = picked.shift();
            Array.prototype.forEach.call(document.querySelectorAll("#runs-table input"), function (b) { if (b.value === drop) b.checked = false; });
          }
          go.disabled = picked.length !== 2;
        });
        return h("tr", {"data-run": run.id}, td(box), td([link("evals/" + enc(evalId) + "/runs/" + enc(run.id), run.name || run.id),
          h("div", {"class": "small muted mono"}, run.id)]), td(badge(run.status)), td(h("span", {"class": "mono"}, run.model)),
          td(counts(run.result_counts), "small"), td(usd(run.rft_cost_usd), "num"), td(when(run.created_at), "hide-sm small"));
      });
      go.addEventListener("click", function () { compare(evalId, picked[0], picked[1], cmp); });
      show(view, ev.name || ev.id, [
        h("p", {"class": "small muted"}, link("evals", "← all evals"), " · ", h("span", {"class": "mono"}, ev.id)),
        card("Testing criteria", h("ul", null, (ev.testing_criteria || []).map(function (c) {
          return h("li", null, h("strong", null, c.name), " — " + c.type + (c.operation ? " " + c.operation : "") +
                   (c.reference ? " " + JSON.stringify(c.reference) : ""));
        }))),
        card("Runs", runs.length ? [h("div", {"class": "table-wrap"}, h("table", {id: "runs-table"}, h("caption", null, "Select two runs to compare them"),
          h("thead", null, h("tr", null, ["", "Run", "Status", "Model", "Results", "Cost", "Created"].map(function (c) { return h("th", {scope: "col"}, c); }))),
          h("tbody", null, rows))), go] : empty("No runs yet.")),
        cmp]);
    });
  }

  function compare(evalId, a, b, into) {
    clear(into).appendChild(empty("Comparing…"));
    return api("v1/evals/" + enc(evalId) + "/compare?limit=50&runs=" + enc(a) + "," + enc(b)).then(function (c) {
      var ra = c.runs[0], rb = c.runs[1];
      clear(into).appendChild(card("Comparison", [
        h("p", null, "A: ", h("span", {"class": "mono"}, ra.id), " (" + ra.model + ") · B: ", h("span", {"class": "mono"}, rb.id),
          " (" + rb.model + ")", c.rft_same_data_source === false ? h("span", {"class": "msg error"}, " · different data sources") : null),
        table("Per testing criterion", ["Criterion", {label: "A mean", cls: "num"}, {label: "B mean", cls: "num"}, {label: "Δ", cls: "num"},
          {label: "A pass", cls: "num"}, {label: "B pass", cls: "num"}], (c.per_testing_criteria || []).map(function (p) {
            return h("tr", null, td(p.testing_criteria), td(num(p.a_mean_score), "num"), td(num(p.b_mean_score), "num"),
              td(num(p.delta_mean_score), "num"), td(num(p.a_pass_rate), "num"), td(num(p.b_pass_rate), "num"));
          })),
        (c.items || []).length ? table("Items where the runs differ most", ["Item", {label: "Disagreement", cls: "num"}, "A", "B", "Δ scores"],
          c.items.map(function (it) {
            function side(s) { return [badge(s.status), " ", Object.keys(s.scores || {}).map(function (k) { return k + " " + num(s.scores[k]); }).join(" · ")]; }
            return h("tr", {"data-item": it.datasource_item_id}, td(it.datasource_item_id, "num"), td(num(it.disagreement), "num"),
              td(side(it.a)), td(side(it.b)), td(Object.keys(it.delta_scores || {}).map(function (k) { return k + " " + num(it.delta_scores[k]); }).join(" · ")));
          }), {id: "diff-items"}) : empty("The two runs agree on every item both graded.")], {id: "comparison-card"}));
    }).catch(function (err) { clear(into).appendChild(h("p", {"class": "msg error", role: "alert"}, errorText(err))); });
  }

  function runPage(view, evalId, runId) {
    var base = "v1/evals/" + enc(evalId) + "/runs/" + enc(runId);
    return Promise.all([api(base), apiAll(base + "/output_items?limit=100", 2)]).then(function (r) {
      var run = r[0], items = r[1].data;
      function outputText(sample) {
        var out = sample && sample.output;
        if (Array.isArray(out)) return out.map(function (o) { return o && (o.content || o.text) || ""; }).join("\n");
        return sample && sample.error ? JSON.stringify(sample.error) : "";
      }
      show(view, run.name || run.id, [
        h("p", {"class": "small muted"}, link("evals/" + enc(evalId), "← eval " + evalId)),
        card("Run", kv([["Run", h("span", {"class": "mono"}, run.id)], ["Status", badge(run.status)], ["Model", run.model],
          ["Results", counts(run.result_counts)], ["Cost", usd(run.rft_cost_usd)], ["Created", when(run.created_at)],
          run.rft_job_id ? ["Job", link("jobs/" + enc(run.rft_job_id), run.rft_job_id)] : null,
          run.error && run.error.message ? ["Error", run.error.message] : null])),
        card("Per testing criterion", table(null, ["Criterion", {label: "Passed", cls: "num"}, {label: "Failed", cls: "num"}],
          (run.per_testing_criteria_results || []).map(function (p) {
            return h("tr", null, td(p.testing_criteria), td(p.passed, "num"), td(p.failed, "num"));
          }))),
        card("Output items", items.length ? items.map(function (it) {
          return h("details", {"class": "rollout"}, h("summary", null, h("strong", null, "item " + it.datasource_item_id), badge(it.status),
            (it.results || []).map(function (res) { return h("span", null, (res.name || "") + " " + num(res.score)); })),
            h("h3", null, "Item"), h("pre", null, JSON.stringify(it.datasource_item, null, 2)),
            h("h3", null, "Output"), h("pre", null, outputText(it.sample)));
        }) : empty("No output items yet."))]);
    });
  }

  // ---- pipelines (static/pipelines.js, given this file's helpers) -----------------------------------

  var pipelinesUi = null;
  function pipelinePages() {
    if (!pipelinesUi) {
      pipelinesUi = window.RftPipelines.pages({
        BASE: BASE, h: h, enc: enc, link: link, badge: badge, num: num, usd: usd, when: when, card: card, table: table,
        td: td, kv: kv, empty: empty, say: say, errorText: errorText, api: api, apiAll: apiAll, show: show,
        navigate: navigate, render: render});
    }
    return pipelinesUi;
  }

  // ---- spend ----------------------------------------------------------------------------------------

  function monthStart() { var d = new Date(); return d.toISOString().slice(0, 8) + "01"; }
  function today() { return new Date().toISOString().slice(0, 10); }

  /** Inference, grader (LLM judges), training and total spend, from /v1/usage's spend_totals. */
  function spendPairs(t, prefix) {
    t = t || {};
    var pairs = [[prefix + "inference", usd(t.inference_usd)], [prefix + "grader (judges)", usd(t.grader_usd)]];
    if (t.other_calls_usd && Number(t.other_calls_usd)) pairs.push([prefix + "other calls", usd(t.other_calls_usd)]);
    return pairs.concat([[prefix + "training", usd(t.training_usd)], [prefix + "total", usd(t.total_usd)]]);
  }

  /** The team's budget; `month`: this month's spend totals, shown whether or not a budget is set
   * (a budget counts only what it holds: without one its own "spent" is no measure of spend). */
  function budgetCard(b, month) {
    if (!b) return card("Budget", empty("No budget information."));
    var limit = b.limit_usd !== null ? Number(b.limit_usd) : null, spent = Number(b.spent_usd || 0), reserved = Number(b.reserved_usd || 0);
    var meter = null;
    if (limit) {
      var sp = h("div", {"class": "spent"}), rs = h("div", {"class": "reserved"});
      meter = h("div", {"class": "meter", role: "img", "aria-label": "Spent " + usd(spent) + " and reserved " + usd(reserved) + " of " + usd(limit)}, sp, rs);
      sp.style.width = Math.min(100, spent / limit * 100) + "%";
      rs.style.left = Math.min(100, spent / limit * 100) + "%";
      rs.style.width = Math.max(0, Math.min(100 - spent / limit * 100, reserved / limit * 100)) + "%";
      (b.alert_thresholds || []).forEach(function (t) {
        var tick = h("div", {"class": "tick", title: "alert at " + Math.round(t * 100) + "%"}, h("span", null, Math.round(t * 100) + "%"));
        tick.style.left = Math.min(100, t * 100) + "%";
        meter.appendChild(tick);
      });
    }
    var period = ["Period", (b.current_period || "") + " (" + b.period + ", resets " + (b.resets_at ? when(b.resets_at) : "–") + ")"];
    var monthSpend = spendPairs(month && month.spend_totals, "Spent this month: ");
    if (limit === null) {
      return card("Budget", [kv([period, ["Limit", "no budget set"]].concat(monthSpend))], {id: "budget"});
    }
    return card("Budget", [meter, kv([period,
      ["Limit", usd(b.limit_usd)], ["Spent against the budget", usd(b.spent_usd)],
      ["Reserved (open holds)", usd(b.reserved_usd) + " in " + b.open_holds + " hold(s)"],
      ["Remaining", b.remaining_usd === null ? "–" : usd(b.remaining_usd)],
      ["Alert thresholds", (b.alert_thresholds || []).map(function (t) { return Math.round(t * 100) + "%"; }).join(", ") || "none"],
      ["Alerted this period", (b.alerted || []).map(function (t) { return Math.round(Number(t) * 100) + "%"; }).join(", ") || "none"]]
      .concat(monthSpend))],
      {id: "budget"});
  }

  function usageTable(u, key, label, admin) {
    var headers = (admin ? ["Team"] : []).concat([label, {label: "Requests", cls: "num"}, {label: "Errors", cls: "num hide-sm"},
      {label: "Input tokens", cls: "num hide-sm"}, {label: "Output tokens", cls: "num hide-sm"}, {label: "Cost", cls: "num"}]);
    var rows = (u.data || []).map(function (d) {
      return h("tr", null, admin ? td(h("span", {"class": "mono"}, d.team_id)) : null, td(d[key]), td(d.requests, "num"),
        td(d.errors, "num hide-sm"), td(d.input_tokens, "num hide-sm"), td(d.output_tokens, "num hide-sm"), td(usd(d.cost_usd), "num"));
    });
    if (!rows.length) return empty("No usage in this period.");
    return table(null, headers, rows, {"data-group": key});
  }

  function spendPage(view) {
    var params = new URLSearchParams(location.search), admin = S.session.principal === "admin";
    var start = params.get("start") || monthStart(), end = params.get("end") || today();
    var range = "start=" + enc(start) + "&end=" + enc(end);
    var calls = [api("v1/usage?group_by=day&" + range), api("v1/usage?group_by=model&" + range), api("v1/usage?group_by=key&" + range),
                 admin ? Promise.resolve(null) : api("v1/budget"),
                 admin ? Promise.resolve(null) : api("v1/usage?group_by=kind&start=" + monthStart())];
    return Promise.all(calls).then(function (r) {
      var byDay = r[0], byModel = r[1], byKey = r[2], budget = r[3], month = r[4];
      var startIn = h("input", {type: "date", id: "sp-start", value: start}), endIn = h("input", {type: "date", id: "sp-end", value: end});
      var form = h("form", {"class": "inline"}, h("label", {"for": "sp-start"}, "From", startIn), h("label", {"for": "sp-end"}, "To", endIn),
                   h("button", {"class": "btn secondary", type: "submit"}, "Show"));
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        navigate(BASE + "spend?start=" + enc(startIn.value) + "&end=" + enc(endIn.value));
      });
      var days = {};
      (byDay.data || []).forEach(function (d) { days[d.day] = (days[d.day] || 0) + Number(d.cost_usd); });
      var chart = h("div", {id: "spend-chart"});
      var csv = function (g) {
        return h("a", {href: API + "v1/usage?format=csv&group_by=" + g + "&" + range, download: "usage-" + g + "-" + start + "-" + end + ".csv",
                       "class": "csv", "data-group": g}, "CSV by " + g);
      };
      var training = (byDay.training || []);
      show(view, admin ? "Spend — every team" : "Spend", [form,
        h("div", {"class": "grid"},
          admin ? null : budgetCard(budget, month),
          card("This period", [kv([["From", byDay.start], ["To", byDay.end]].concat(spendPairs(byDay.spend_totals, "Spent: "))),
            h("p", {"class": "row"}, "Download: ", csv("day"), csv("model"), csv("key"))])),
        card("By day", [chart, usageTable(byDay, "day", "Day", admin)], {id: "by-day"}),
        card("By model", usageTable(byModel, "model", "Model", admin), {id: "by-model"}),
        card("By key", usageTable(byKey, "key_id", "Key", admin), {id: "by-key"}),
        card("Training jobs", training.length ? table(null, (admin ? ["Team"] : []).concat(["Job", "Model", "Status",
          {label: "Estimated", cls: "num"}, {label: "Settled", cls: "num"}, {label: "Judge spent", cls: "num"}]),
          training.map(function (t) {
            return h("tr", null, admin ? td(h("span", {"class": "mono"}, t.team_id)) : null,
              td(admin ? h("span", {"class": "mono"}, t.job_id) : link("jobs/" + enc(t.job_id), t.job_id)), td(t.model), td(badge(t.status)),
              td(usd(t.estimated_usd), "num"), td(usd(t.settled_usd), "num"), td(usd(t.judge_spent_usd), "num"));
          })) : empty("No training jobs created in this period."))]);
      var keys = Object.keys(days).sort();
      if (keys.length) {
        window.RftChart.bars(chart, {label: "Spend by day, USD (inference and judge calls)", prefix: "$", unit: "USD",
          items: keys.map(function (d) { return {label: d, short: d.slice(5), value: days[d], text: usd(days[d])}; })});
      }
    });
  }

  // ---- admin ----------------------------------------------------------------------------------------

  function adminPage(view) {
    if (S.session.principal !== "admin") { show(view, "Admin", empty("Sign in with the admin key for every team's budgets and prices.")); return null; }
    return Promise.all([api("v1/admin/teams"), api("v1/usage?group_by=kind&start=" + monthStart()), api("v1/admin/prices"),
                        api("v1/admin/audit?limit=20")]).then(function (r) {
      var teams = r[0].data || r[0] || [], usage = r[1], prices = r[2].data || [], audit = r[3].data || [];
      var byTeam = usage.spend_by_team || {};
      return Promise.all(teams.map(function (t) {
        return api("v1/admin/teams/" + enc(t.id) + "/budget").catch(function () { return null; });
      })).then(function (budgets) {
        var all = usage.spend_totals || {};
        show(view, "Admin", [
          card("Every team this month", kv(spendPairs(all, "Spent: ")), {id: "admin-totals"}),
          card("Teams this month", table(null, ["Team", {label: "Inference", cls: "num"}, {label: "Grader", cls: "num hide-sm"},
            {label: "Training", cls: "num hide-sm"}, {label: "Spent", cls: "num"}, {label: "Budget", cls: "num"},
            {label: "Reserved", cls: "num hide-sm"}, {label: "Remaining", cls: "num"}, "Thresholds"],
            teams.map(function (t, i) {
              var b = budgets[i] || {}, s = byTeam[t.id] || {};
              return h("tr", {"data-team": t.id}, td([h("strong", null, t.name), h("div", {"class": "small muted mono"}, t.id)]),
                td(usd(s.inference_usd || 0), "num"), td(usd(s.grader_usd || 0), "num hide-sm"),
                td(usd(s.training_usd || 0), "num hide-sm"), td(usd(s.total_usd || 0), "num spent"),
                td(b.limit_usd === null || b.limit_usd === undefined ? "none" : usd(b.limit_usd), "num"),
                td(b.limit_usd ? usd(b.reserved_usd) : "–", "num hide-sm"), td(b.remaining_usd ? usd(b.remaining_usd) : "–", "num"),
                td((b.alert_thresholds || []).map(function (x) { return Math.round(x * 100) + "%"; }).join(", ") || "–"));
            }), {id: "teams-table"}), {id: "teams"}),
          card("Prices (USD per 1M tokens)", table(null, ["Model", {label: "Input", cls: "num"}, {label: "Cached input", cls: "num hide-sm"},
            {label: "Output", cls: "num"}, {label: "Source", cls: "hide-sm"}], prices.map(function (p) {
              return h("tr", null, td(h("span", {"class": "mono"}, p.model || p.id)), td(p.input_usd_per_1m, "num"),
                td(p.cached_input_usd_per_1m || "–", "num hide-sm"), td(p.output_usd_per_1m, "num"),
                td(h("span", {"class": "small muted"}, (p.override ? "override · " : "") + (p.source || "")), "hide-sm"));
            })), {id: "prices"}),
          // The audit log (issue #29): the newest security-relevant acts; GET /v1/admin/audit pages and filters.
          card("Audit log (newest 20)", audit.length ? table(null, ["When", "Action", "Target", "Actor", {label: "Team", cls: "hide-sm"}],
            audit.map(function (e) {
              return h("tr", {"data-entry": e.id}, td(when(e.created_at)), td(h("span", {"class": "mono"}, e.action)),
                td(h("span", {"class": "mono"}, e.target)), td(h("span", {"class": "mono small"}, e.actor)),
                td(h("span", {"class": "mono small"}, e.team_id || "–"), "hide-sm"));
            })) : empty("No audited act yet."), {id: "audit"})]);
      });
    });
  }

  // ---- start ----------------------------------------------------------------------------------------

  loadSession().then(function (s) { return s ? afterSignIn() : null; }).then(function () { showChrome(); render(); });
})();
