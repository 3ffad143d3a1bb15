"""Block Kit messages for rft-hub's events and slash commands (slack-sdk models, which
enforce Block Kit's limits on `to_dict()`; long values are truncated first)."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _b():
    """slack-sdk's Block Kit models, imported when a message is built (not at every cold start)."""
    from slack_sdk.models import blocks

    return blocks

HEADER_MAX, FIELD_MAX, SECTION_MAX, FALLBACK_MAX = 150, 2000, 3000, 3000
SPARK = "▁▂▃▄▅▆▇█"
STATUS_EMOJI = {"validating_files": ":hourglass_flowing_sand:", "queued": ":inbox_tray:", "running": ":runner:",
                "succeeded": ":white_check_mark:", "failed": ":x:", "cancelled": ":no_entry_sign:"}
# Which notification category each event belongs to (teams choose with `notify`).
CATEGORY = {"rft-hub.job.state_changed": "job", "rft-hub.job.stalled": "job", "rft-hub.model.registered": "model",
            "rft-hub.alias.changed": "model", "rft-hub.budget.threshold_crossed": "budget",
            "rft-hub.job.watch_finding": "job", "rft-hub.model.deployment_changed": "model",
            "rft-hub.eval.run_finished": "eval", "rft-hub.eval.compared": "eval",
            "rft-hub.pipeline.approval_requested": "pipeline", "rft-hub.pipeline.run_finished": "pipeline"}
# Posted whatever a team's `notify` says: a run waits on it.
ALWAYS = frozenset({"rft-hub.pipeline.approval_requested"})
APPROVE, REJECT = "pipeline_approve", "pipeline_reject"
DECIDED = {"approve": "approved", "reject": "rejected"}


def truncate(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in values[-40:])


def _fields(pairs: list[tuple[str, str]]):
    return _b().SectionBlock(fields=[_b().MarkdownTextObject(text=truncate(f"*{k}*\n{v}", FIELD_MAX))
                                     for k, v in pairs[:10]])


def _message(text: str, blocks: list) -> dict:
    return {"text": truncate(text, FALLBACK_MAX), "blocks": [b.to_dict() for b in blocks]}


def job_message(detail: dict, rewards: list[float], status_path: list[str], budget_line: str | None) -> dict:
    job = detail.get("job") or {}
    status = detail.get("status", "")
    emoji = STATUS_EMOJI.get(status, ":information_source:")
    best = f"{max(rewards):.3f}" if rewards else "—"
    header = truncate(f"{emoji} RFT job {status.replace('_', ' ')}: {job.get('suffix') or job.get('job_id')}",
                      HEADER_MAX)
    pairs = [("Job", f"`{job.get('job_id')}`"), ("Base model", job.get("model") or "—"),
             ("Status", " → ".join(status_path or [detail.get("previous_status", "?"), status])),
             ("Best reward", best)]
    if job.get("fine_tuned_model"):
        pairs.append(("Model", f"`{job['fine_tuned_model']}`"))
    if budget_line:
        pairs.append(("Cost so far", budget_line))
    blocks = [_b().HeaderBlock(text=_b().PlainTextObject(text=header, emoji=True)), _fields(pairs)]
    if rewards:
        blocks.append(_b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(
            f"*Reward curve* `{sparkline(rewards)}` ({rewards[0]:.2f} → {rewards[-1]:.2f})", SECTION_MAX))))
    error = job.get("error") or {}
    if status == "failed" and error.get("message"):
        blocks.append(_b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(f"*Failure*\n```{error['message']}```",
                                                                         SECTION_MAX))))
    blocks.append(_b().ContextBlock(elements=[_b().MarkdownTextObject(text=truncate(
        f"Bedrock job `{job.get('bedrock_job_id') or 'not submitted'}` · source: {detail.get('source', '?')}",
        SECTION_MAX))]))
    text = f"RFT job {job.get('job_id')} ({job.get('model')}) {status}; best reward {best}"
    if status == "failed" and error.get("message"):
        text += f": {error['message']}"
    return _message(text, blocks)


def stalled_message(detail: dict) -> dict:
    job = detail.get("job") or {}
    minutes = int(detail.get("no_progress_seconds", 0)) // 60
    text = f"RFT job {job.get('job_id')} has made no progress for {minutes} minutes (status {detail.get('status')})."
    return _message(text, [_b().HeaderBlock(text=_b().PlainTextObject(text=":warning: RFT job stalled", emoji=True)),
                           _b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(text, SECTION_MAX)))])


def watch_finding_message(detail: dict) -> dict:
    """A training-watch finding: what it saw, in which windows, and what rft-hub did about it."""
    job = detail.get("job") or {}
    critical = detail.get("severity") == "critical"
    cancel = detail.get("action") == "cancel"
    title = truncate(f"{':rotating_light:' if critical else ':eyes:'} Training watch: {detail.get('title')}", HEADER_MAX)
    action = "rft-hub is cancelling the job." if cancel else "The job keeps training; look at the rollouts."
    examples = ", ".join(f"`{e.get('id')}` ({e.get('reward')})" for e in (detail.get("examples") or [])[:3]) or "—"
    pairs = [("Job", f"`{job.get('job_id')}`"), ("Severity", str(detail.get("severity"))),
             ("Finding", f"`{detail.get('code')}`"), ("Windows", ", ".join(str(w) for w in detail.get("windows") or [])
                                                      or "—"),
             ("Action", action), ("Example rollouts", examples)]
    text = (f"RFT job {job.get('job_id')}: training watch {detail.get('severity')} finding {detail.get('code')}: "
            f"{detail.get('message')} {action}")
    return _message(text, [_b().HeaderBlock(text=_b().PlainTextObject(text=title, emoji=True)),
                           _b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(str(detail.get("message")),
                                                                                        SECTION_MAX))),
                           _fields(pairs)])


def _score(value) -> str:
    return "no score" if not isinstance(value, (int, float)) else f"{value:.3f}"


def _move_evidence(detail: dict) -> str:
    """What justified a gated move: the eval run and, per criterion, its score against the gate
    and the current model; or the admin's override reason."""
    if detail.get("override_reason"):
        return f"\nGate overridden by the admin: {detail['override_reason']}"
    if not detail.get("eval_run_id"):
        return ""
    lines = [f"\nEval `{detail.get('eval_id')}`, run `{detail['eval_run_id']}`:"]
    for name, entry in sorted((detail.get("comparison") or {}).items()):
        line = f"• {name}: {_score(entry.get('score'))}"
        if "min_score" in entry:
            line += f" (gate ≥ {entry['min_score']:g})"
        if "current_score" in entry:
            line += f", current model {_score(entry.get('current_score'))}"
        lines.append(line)
    return "\n".join(lines)


def model_message(detail_type: str, detail: dict) -> dict:
    if detail_type == "rft-hub.model.registered":
        text = (f"New tuned model `{detail.get('model')}` from job `{detail.get('job_id')}` "
                f"(base {detail.get('base_model')}, best reward {detail.get('best_reward')}).")
        title = ":package: Model registered"
    else:
        text = (f"Alias `{detail.get('alias')}` now points to `{detail.get('model')}` (version {detail.get('version')}, "
                f"was {detail.get('previous_model') or 'unset'}; by {detail.get('changed_by')}).")
        text += _move_evidence(detail)
        title = ":label: Alias changed"
    return _message(text, [_b().HeaderBlock(text=_b().PlainTextObject(text=title, emoji=True)),
                           _b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(text, SECTION_MAX)))])


# A Nova model's deployment (issue #15): said when it is ready, failed or gone, not while it is made.
_DEPLOYMENT = {"Active": (":rocket: Model deployed", "is deployed and answers calls"),
               "Failed": (":x: Model deployment failed", "could not be deployed"),
               "Deleted": (":wastebasket: Model deployment deleted", "is no longer deployed")}


def deployment_message(detail: dict) -> dict | None:
    said = _DEPLOYMENT.get(str(detail.get("status")))
    if said is None:
        return None
    title, verb = said
    text = f"Tuned model `{detail.get('model')}` (job `{detail.get('job_id')}`) {verb}."
    if detail.get("status") == "Failed" and detail.get("failure_message"):
        text += f" Amazon Bedrock: {detail['failure_message']}"
    if detail.get("status") == "Deleted":
        text += " No alias points at it any more; pointing one at it deploys it again."
    pairs = [("Base model", str(detail.get("base_model"))), ("Deployment", f"`{detail.get('deployment_arn') or '—'}`")]
    return _message(text, [_b().HeaderBlock(text=_b().PlainTextObject(text=title, emoji=True)),
                           _b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(text, SECTION_MAX))),
                           _fields(pairs)])


def _scores(scores: dict | None) -> str:
    return ", ".join(f"{name} {_score(value)}" for name, value in sorted((scores or {}).items())) or "no scores"


def eval_run_message(detail: dict) -> dict:
    ok = detail.get("status") == "completed"
    title = f"{':bar_chart:' if ok else ':warning:'} Eval run {detail.get('status')}"
    text = (f"Eval `{detail.get('eval_id')}`, run `{detail.get('run_id')}` on `{detail.get('model')}` "
            f"{detail.get('status')}: {_scores(detail.get('mean_scores'))} (cost ${detail.get('cost_usd')}).")
    if (detail.get("error") or {}).get("message"):
        text += f" {detail['error']['message']}"
    counts = detail.get("result_counts") or {}
    pairs = [("Passed", str(counts.get("passed", "—"))), ("Failed", str(counts.get("failed", "—"))),
             ("Errored", str(counts.get("errored", "—"))), ("Job", f"`{detail.get('job_id') or '—'}`")]
    return _message(text, [_b().HeaderBlock(text=_b().PlainTextObject(text=truncate(title, HEADER_MAX), emoji=True)),
                           _b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(text, SECTION_MAX))),
                           _fields(pairs)])


def eval_comparison_message(detail: dict) -> dict:
    """A succeeded job's evals: the base model, the tuned model and its checkpoints side by side."""
    lines = [f"• {row.get('role')} `{row.get('model')}` ({row.get('status')}): {_scores(row.get('mean_scores'))}"
             for row in detail.get("runs") or []]
    text = f"Evals of job `{detail.get('job_id')}` on eval `{detail.get('eval_id')}`:\n" + "\n".join(lines)
    return _message(text, [_b().HeaderBlock(text=_b().PlainTextObject(text=":bar_chart: Job evaluated", emoji=True)),
                           _b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(text, SECTION_MAX)))])


def budget_message(detail: dict) -> dict:
    pct = int(float(detail.get("threshold", 0)) * 100)
    text = (f"Team budget {pct}% reached: ${detail.get('spent_usd')} of ${detail.get('limit_usd')} spent in "
            f"{detail.get('period')}.")
    return _message(text, [_b().HeaderBlock(text=_b().PlainTextObject(text=f":moneybag: Budget {pct}% reached", emoji=True)),
                           _fields([("Spent", f"${detail.get('spent_usd')}"), ("Limit", f"${detail.get('limit_usd')}"),
                                    ("Period", str(detail.get("period"))),
                                    ("Resets", f"<!date^{int(detail.get('resets_at', 0))}^{{date_short}}|next month>")])])


def ephemeral(text: str, lines: list[str] | None = None) -> dict:
    blocks = [_b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(text, SECTION_MAX)))]
    if lines:
        blocks.append(_b().DividerBlock())
        blocks.append(_b().SectionBlock(text=_b().MarkdownTextObject(text=truncate("\n".join(lines), SECTION_MAX))))
    return {"response_type": "ephemeral", **_message(text, blocks)}


ALARM_EMOJI = {"ALARM": ":rotating_light:", "OK": ":white_check_mark:", "INSUFFICIENT_DATA": ":grey_question:"}


def alarm_message(alarm: dict) -> dict:
    """A CloudWatch alarm's state change (its SNS notification), for the platform's own channel."""
    state = str(alarm.get("NewStateValue") or "?")
    name = str(alarm.get("AlarmName") or "?")
    header = truncate(f"{ALARM_EMOJI.get(state, ':bell:')} {state}: {name}", HEADER_MAX)
    pairs = [("State", f"{alarm.get('OldStateValue') or '?'} → {state}"),
             ("Since", str(alarm.get("StateChangeTime") or "?"))]
    blocks = [_b().HeaderBlock(text=_b().PlainTextObject(text=header, emoji=True)), _fields(pairs)]
    if alarm.get("AlarmDescription"):
        blocks.append(_b().SectionBlock(text=_b().MarkdownTextObject(
            text=truncate(str(alarm["AlarmDescription"]), SECTION_MAX))))
    if alarm.get("NewStateReason"):
        blocks.append(_b().SectionBlock(text=_b().MarkdownTextObject(
            text=truncate(f"_{alarm['NewStateReason']}_", SECTION_MAX))))
    return _message(f"{state}: {name} ({alarm.get('OldStateValue') or '?'} → {state})", blocks)


# ---- pipelines (issue #27) -----------------------------------------------------------------------

def _comparison_lines(comparison: dict | None) -> list[str]:
    lines = []
    for name, entry in (comparison or {}).items():
        line = f"• *{name}*: candidate {_score(entry.get('score'))}"
        if "current_score" in entry:
            line += f" vs production {_score(entry.get('current_score'))} (Δ {_score(entry.get('delta'))})"
        if "min_score" in entry:
            line += f", minimum {_score(entry.get('min_score'))}"
        lines.append(line)
    return lines


def pipeline_approval_message(detail: dict) -> dict:
    """The candidate against production per criterion, the watch's findings and the cost, with
    Approve and Reject buttons whose value names the run (never a token: the run keeps it)."""
    value = f"{detail.get('team_id')}/{detail.get('pipeline_id')}/{detail.get('run_id')}"
    watch = detail.get("watch") or {}
    found = ", ".join(f"{n} {sev}" for sev, n in sorted((watch.get("findings") or {}).items())) or "none"
    text = (f"Pipeline `{detail.get('pipeline_name')}` run `{detail.get('run_id')}` asks to move alias "
            f"`{detail.get('target_alias')}` to `{detail.get('candidate_model')}`.")
    body = "\n".join([text, *(_comparison_lines(detail.get("comparison")) or ["• no comparison"])])
    approvers = " ".join(f"<@{u}>" for u in detail.get("approvers") or [])
    return _message(text, [
        _b().HeaderBlock(text=_b().PlainTextObject(text=":vertical_traffic_light: Approval needed", emoji=True)),
        _b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(body, SECTION_MAX))),
        _fields([("Production", f"`{detail.get('current_model') or 'none yet'}`"),
                 ("Training watch", truncate(found + ("; " + "; ".join(watch.get("titles") or [])
                                                      if watch.get("titles") else ""), 300)),
                 ("Cost (estimate)", f"${detail.get('cost_usd')}" if detail.get("cost_usd") else "unpriced"),
                 ("Decide by", f"<!date^{int(detail.get('expires_at') or 0)}^{{date_short}} {{time}}|the timeout>"),
                 ("Approvers", approvers or "none")]),
        _b().ActionsBlock(block_id=f"pipeline:{detail.get('run_id')}"[:255], elements=[
            _b().ButtonElement(text="Approve", action_id=APPROVE, value=value, style="primary"),
            _b().ButtonElement(text="Reject", action_id=REJECT, value=value, style="danger")]),
    ])


def pipeline_decided_message(detail: dict, decision: str, user: str, late: bool) -> dict:
    """Replaces the approval message once someone decided (its buttons gone)."""
    verb = DECIDED.get(decision, "decided")
    text = (f"Pipeline `{detail.get('pipeline_name') or detail.get('pipeline_id')}` run `{detail.get('run_id')}`: "
            f"{verb} by <@{user}>.")
    if late:
        text += " Too late: the approval had already timed out, so the run was rejected."
    return {"replace_original": True, **_message(text, [_b().SectionBlock(text=_b().MarkdownTextObject(text=text))])}


RUN_EMOJI = {"succeeded": ":white_check_mark:", "skipped_unchanged": ":fast_forward:", "gate_failed": ":no_entry:",
             "rejected": ":no_entry_sign:", "failed": ":x:"}


def pipeline_run_message(detail: dict) -> dict:
    status = str(detail.get("status"))
    error = detail.get("error") or {}
    text = f"Pipeline `{detail.get('pipeline_name')}` run `{detail.get('run_id')}` *{status}*."
    if status == "succeeded":
        text += f" Alias `{detail.get('target_alias')}` now points at `{detail.get('candidate_model')}`."
    elif error.get("message"):
        text += f" {('At ' + error['step'] + ': ') if error.get('step') else ''}{error['message']}"
    lines = _comparison_lines(detail.get("comparison"))
    approval = detail.get("approval") or {}
    if approval.get("by"):
        lines.append(f"• {DECIDED.get(approval.get('decision'), 'decided')} by <@{approval['by']}>")
    body = "\n".join([text, *lines])
    return _message(text, [_b().HeaderBlock(text=_b().PlainTextObject(
        text=f"{RUN_EMOJI.get(status, ':gear:')} Pipeline run {status}", emoji=True)),
        _b().SectionBlock(text=_b().MarkdownTextObject(text=truncate(body, SECTION_MAX)))])
