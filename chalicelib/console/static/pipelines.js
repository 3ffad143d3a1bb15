/* rft-hub console: the Pipelines pages (issue #27), kept apart from console.js to keep each file small.
 *
 * console.js calls RftPipelines.pages(ui) with its own helpers (ui.h builds elements and sets every value
 * as text, never as HTML) and routes /console/pipelines, /console/pipelines/<id> and
 * /console/pipelines/<id>/runs/<run id> to the three pages returned. Data: GET /v1/pipelines, a
 * pipeline's runs and a run; Approve and Reject are POST .../approve and .../reject, which the API allows
 * only to a key whose owner is one of the pipeline's approvers (otherwise a 403 the page shows as is).
 */
(function () {
  "use strict";

  var ENDED = ["succeeded", "skipped_unchanged", "gate_failed", "rejected", "failed", "dropped"];

  function pages(ui) {
    var h = ui.h, enc = ui.enc, link = ui.link, badge = ui.badge, num = ui.num, td = ui.td, kv = ui.kv, card = ui.card;

    function path(id) { return "v1/pipelines/" + enc(id); }
    function mono(text) { return h("span", {"class": "mono"}, text); }
    /** ISO times (a trigger's `at`) as the other pages show epoch seconds. */
    function iso(s) {
      var t = s ? Date.parse(s) : NaN;
      return isNaN(t) ? (s || "–") : new Date(t).toLocaleString();
    }
    function duration(start, end) {
      if (typeof start !== "number" || typeof end !== "number") return "–";
      var s = Math.max(0, end - start);
      return s < 60 ? s + " s" : Math.floor(s / 60) + " min " + (s % 60) + " s";
    }
    function triggerSummary(t) {
      t = t || {};
      return [t.schedule ? t.schedule : null, t.new_data ? "new data" : null, "manual",
              t.on_busy ? "when busy: " + t.on_busy : null].filter(Boolean).join(" · ");
    }
    function approvalSummary(a) {
      a = a || {};
      if (a.mode !== "slack") return a.mode || "–";
      return "Slack: " + (a.approvers || []).join(", ") + (a.timeout_seconds ? " (within " + a.timeout_seconds + " s)" : "");
    }
    function datasetSummary(d) {
      d = d || {};
      return d.file_id || d.id ? "file " + (d.file_id || d.id) : d.prefix ? "newest JSONL under the prefix" : JSON.stringify(d);
    }
    function triggerText(t) {
      t = t || {};
      return [t.kind || "–", t.by ? "by " + t.by : null, t.at ? "at " + iso(t.at) : null].filter(Boolean).join(" ");
    }
    function detailText(d) {
      if (d === null || d === undefined || d === "") return "";
      return typeof d === "string" ? d : JSON.stringify(d);
    }

    // ---- the team's pipelines ------------------------------------------------------------------------

    function listPage(view) {
      return ui.apiAll("v1/pipelines?limit=100", 5).then(function (res) {
        var pipelines = res.data;
        // The last run's status: one read per pipeline (the list names the run, not its status).
        return Promise.all(pipelines.map(function (p) {
          return p.last_run ? ui.api(path(p.id) + "/runs/" + enc(p.last_run)).catch(function () { return null; })
                            : Promise.resolve(null);
        })).then(function (last) {
          ui.show(view, "Pipelines", card(null, pipelines.length ? ui.table(null, ["Pipeline", "Target alias", "Triggers",
            {label: "Approval", cls: "hide-sm"}, "Last run", {label: "Version", cls: "num hide-sm"}],
            pipelines.map(function (p, i) {
              var run = last[i];
              return h("tr", {"data-pipeline": p.id},
                td([link("pipelines/" + enc(p.id), p.name), h("div", {"class": "small muted mono"}, p.id)]),
                td(mono(p.target_alias)), td(triggerSummary(p.triggers)), td(approvalSummary(p.approval), "hide-sm"),
                td(run ? [badge(run.status), " ", h("span", {"class": "small muted"}, ui.when(run.created_at))]
                       : p.active_run ? badge("running") : h("span", {"class": "muted"}, "none yet")),
                td(p.version, "num hide-sm"));
            }), {id: "pipelines-table"})
            : ui.empty("No pipelines yet: POST /v1/pipelines creates one (docs/pipelines.md).")));
        });
      });
    }

    // ---- one pipeline and its runs -------------------------------------------------------------------

    function pipelinePage(view, id) {
      return Promise.all([ui.api(path(id)), ui.apiAll(path(id) + "/runs?limit=50", 2)]).then(function (r) {
        var p = r[0], runs = r[1].data, gate = p.eval || {};
        var msg = h("p", {"class": "msg", role: "status", id: "start-msg"});
        var start = h("button", {"class": "btn", type: "button", id: "start-run"}, "Start a run");
        start.addEventListener("click", function () {
          start.disabled = true;
          ui.api(path(id) + "/runs", {method: "POST"}).then(function (run) {
            ui.navigate(ui.BASE + "pipelines/" + enc(id) + "/runs/" + enc(run.id));
          }).catch(function (err) {
            start.disabled = false;
            msg.className = "msg error"; msg.textContent = ui.errorText(err);
          });
        });
        ui.show(view, p.name, [
          h("p", {"class": "small muted"}, link("pipelines", "← pipelines")),
          h("div", {"class": "grid"},
            card("Pipeline", kv([["Id", mono(p.id)], ["Version", p.version], ["Target alias", link("models", p.target_alias)],
              ["Dataset", datasetSummary(p.dataset)], ["Upload prefix", mono(p.dataset_prefix)],
              ["Base model", p.job && p.job.model], ["Triggers", triggerSummary(p.triggers)],
              ["Approval", approvalSummary(p.approval)], ["Created", ui.when(p.created_at)], ["Updated", ui.when(p.updated_at)]]),
              {id: "pipeline"}),
            card("Gate", kv([["Eval", gate.eval_id ? link("evals/" + enc(gate.eval_id), gate.eval_id) : "–"],
              ["Criteria", Object.keys(gate.criteria || {}).map(function (k) { return k + " ≥ " + gate.criteria[k]; }).join(", ") || "–"],
              ["No worse than production", gate.no_worse_than_current ? "yes" : "no"],
              ["Least items graded", gate.min_items === undefined ? "–" : gate.min_items]]), {id: "gate"})),
          card("Runs", [h("div", {"class": "row"}, start, msg),
            runs.length ? ui.table(null, ["Run", "Status", "Trigger", {label: "Waiting on", cls: "hide-sm"}, "Started",
              {label: "Ended", cls: "hide-sm"}, {label: "Job", cls: "hide-sm"}],
              runs.map(function (run) {
                return h("tr", {"data-run": run.id}, td(link("pipelines/" + enc(id) + "/runs/" + enc(run.id), run.id)),
                  td(badge(run.status)), td(triggerText(run.trigger)), td(ENDED.indexOf(run.status) < 0 && run.waiting_on || "–", "hide-sm"),
                  td(ui.when(run.created_at)), td(ui.when(run.ended_at), "hide-sm"),
                  td(run.job_id ? link("jobs/" + enc(run.job_id), run.job_id) : "–", "hide-sm"));
              }), {id: "runs-table"}) : ui.empty("No runs yet.")], {id: "runs"})]);
      });
    }

    // ---- one run: its steps, the comparison, the approval --------------------------------------------

    function comparisonCard(run) {
      var c = run.comparison || {}, names = Object.keys(c);
      if (!names.length) return card("Candidate against production", ui.empty("No comparison yet (the gate has not run)."), {id: "comparison"});
      return card("Candidate against production", [
        kv([["Candidate", mono(run.candidate_model || "–")], ["Production", mono(run.current_model || "none (the alias is new)")]]),
        ui.table("Mean score per criterion", ["Criterion", {label: "Candidate", cls: "num"}, {label: "Production", cls: "num"},
          {label: "Δ", cls: "num"}, {label: "Gate minimum", cls: "num"}],
          names.map(function (name) {
            var e = c[name] || {};
            return h("tr", {"data-criterion": name}, td(name), td(num(e.score, 4), "num"), td(num(e.current_score, 4), "num"),
              td(num(e.delta, 4), "num"), td(e.min_score === undefined ? "–" : num(e.min_score, 4), "num"));
          }), {id: "comparison-table"})], {id: "comparison"});
    }

    function approvalCard(view, p, run) {
      var a = run.approval, cfg = p.approval || {};
      if (a) {
        return card("Approval", kv([["Decision", badge(a.decision === "approve" ? "approved" : "rejected")], ["By", a.by],
          ["When", ui.when(a.at)], ["Via", a.via || "–"], a.late ? ["Late", "after the timeout: the run was rejected"] : null]),
          {id: "approval"});
      }
      if (run.status !== "awaiting_approval") {
        return card("Approval", ui.empty(cfg.mode === "slack" ? "Not asked yet." : "Automatic (no person decides)."), {id: "approval"});
      }
      var msg = h("p", {"class": "msg", role: "alert", id: "decision-msg"});
      var buttons = [];
      function decide(decision) {
        buttons.forEach(function (b) { b.disabled = true; });
        msg.className = "msg"; msg.textContent = "Sending…";
        ui.api(path(p.id) + "/runs/" + enc(run.id) + "/" + decision, {method: "POST"}).then(function (res) {
          var by = res && res.run && res.run.approval ? res.run.approval.by : "you";
          if (!view.alive()) return;
          ui.render();                              // the run as it is now (render clears the status line first)
          ui.say((decision === "approve" ? "Approved" : "Rejected") + " by " + by + ".");
        }).catch(function (err) {
          buttons.forEach(function (b) { b.disabled = false; });
          msg.className = "msg error"; msg.textContent = ui.errorText(err);
        });
      }
      buttons = [h("button", {"class": "btn", type: "button", id: "approve-run", onclick: function () { decide("approve"); }},
                   "Approve: move " + p.target_alias + " to the candidate"),
                 h("button", {"class": "btn danger", type: "button", id: "reject-run", onclick: function () { decide("reject"); }},
                   "Reject")];
      return card("Approval", [
        h("p", null, "Waiting for one of: ", (cfg.approvers || []).join(", ") || "–",
          cfg.timeout_seconds ? " (a reject after " + cfg.timeout_seconds + " s without a decision)" : ""),
        h("p", {"class": "small muted"}, "Deciding here needs a key whose owner is one of these approvers."),
        h("div", {"class": "row"}, buttons), msg], {id: "approval"});
    }

    function runPage(view, id, runId) {
      return Promise.all([ui.api(path(id)), ui.api(path(id) + "/runs/" + enc(runId))]).then(function (r) {
        var p = r[0], run = r[1], evalId = p.eval && p.eval.eval_id, er = run.eval_runs || {};
        function evalRun(rid) { return rid && evalId ? link("evals/" + enc(evalId) + "/runs/" + enc(rid), rid) : rid || "–"; }
        var title = h("span", null, run.id, " ", badge(run.status));
        var actions = ENDED.indexOf(run.status) < 0 ? h("div", {"class": "row"},
          h("button", {"class": "btn secondary", type: "button", id: "refresh-run", onclick: function () { ui.render(); }}, "Refresh")) : null;
        if (!ui.show(view, "Run " + run.id, [
          h("p", {"class": "small muted"}, link("pipelines/" + enc(id), "← " + p.name)), actions,
          h("div", {"class": "grid"},
            card("Run", kv([["Status", badge(run.status)], ["Pipeline version", run.pipeline_version],
              ["Trigger", triggerText(run.trigger)], run.waiting_on && ENDED.indexOf(run.status) < 0 ? ["Waiting on", run.waiting_on] : null,
              ["Job", run.job_id ? link("jobs/" + enc(run.job_id), run.job_id) : "–"],
              ["Eval runs", [h("span", null, "candidate "), evalRun(er.candidate), h("span", null, " · production "), evalRun(er.current)]],
              ["Held against the budget", run.held_usd === null || run.held_usd === undefined ? "nothing" : ui.usd(run.held_usd)],
              run.alias_version !== null && run.alias_version !== undefined ? ["Alias version", p.target_alias + " v" + run.alias_version] : null,
              ["Started", ui.when(run.created_at)], ["Ended", ui.when(run.ended_at)]]), {id: "run"}),
            approvalCard(view, p, run)),
          run.error ? card("Error", h("p", {"class": "msg error"}, (run.error.step ? run.error.step + ": " : "") + (run.error.message || "")),
                           {id: "run-error"}) : null,
          card("Steps", (run.steps || []).length ? ui.table(null, ["Step", "Status", "Started", {label: "Ended", cls: "hide-sm"},
            {label: "Took", cls: "num"}, {label: "Detail", cls: "hide-sm"}], run.steps.map(function (s) {
              return h("tr", {"data-step": s.name}, td(s.name), td(badge(s.status)), td(ui.when(s.started_at)),
                td(ui.when(s.ended_at), "hide-sm"), td(duration(s.started_at, s.ended_at), "num"),
                td(h("span", {"class": "small mono"}, detailText(s.detail)), "detail hide-sm"));
            }), {id: "steps-table"}) : ui.empty("No step has started yet."), {id: "steps"}),
          comparisonCard(run)])) return;
        document.getElementById("page-title").replaceChildren(title);
      });
    }

    return {list: listPage, pipeline: pipelinePage, run: runPage};
  }

  window.RftPipelines = {pages: pages};
})();
