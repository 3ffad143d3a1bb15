"""The live training watch: findings from the rollouts' windows, raised once each.

After every reward invocation the hosted grader calls `check` for the jobs it graded: two bounded
queries (the job's first and newest windows, at most domain/watch.py MAX_SPAN each) and the pure
analysis. A new finding (per code and severity) is recorded once -- a conditional put in the
same transaction as its outbound event (`rft-hub.job.watch_finding`, posted to Slack like every
job event) -- then as a job event (`type: message`, level warn or error). When the job asked for
`"watch": {"on_critical": "cancel"}`, a critical finding stops it: `record.request_stop` records the
reason and the same invocation asks Bedrock to cancel (`enforce_stop`; the reconciler repeats it if
that fails). If Bedrock finishes first the job still ends `cancelled` and its model is registered
quarantined (inference/registry.py: never served until the admin releases it; docs/watch.md).
"""
from __future__ import annotations

from pynamodb.exceptions import DoesNotExist, TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib import metrics, outbox
from chalicelib.domain import ids, numbers
from chalicelib.domain import watch as rules
from chalicelib.errors import InvalidRequest
from chalicelib.grading import graders
from chalicelib.inference import registry
from chalicelib.log import logger
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import Job, JobEvent, Rollout, RolloutWindow, WatchFinding, connection
from chalicelib.training import record as job_record
from chalicelib.training import rollouts

AUDIT_PARAM = "method.reinforcement.audit_grader"
STOP_CODE = "reward_hacking_suspected"
DETAIL_TYPE = "rft-hub.job.watch_finding"
METRICS_EVENTS_READ = 200


def audit_ref(team_id: str, spec: dict | None, allowed=None) -> str | None:
    """Checks a job's audit grader like any grader of the team (judges priced and allowed, by the team
    and by the calling key's model list, Lambdas registered) and stores it by hash; None without one."""
    if spec is None:
        return None

    graders.compile_spec(spec, AUDIT_PARAM, team_id, allowed=allowed)
    return graders.store_spec(spec)


def configure(team_id: str, job_id: str, options: dict | None, audit: str | None) -> None:
    rollouts.configure(team_id, job_id, (options or {}).get("on_critical") or "alert", audit)


def _stats(item: RolloutWindow) -> dict:
    return {name: float(getattr(item, name) or 0) for name in rules.STATS}


def _windows(team_id: str, job_id: str, newest: bool) -> list[tuple[int, dict]]:
    key = rollouts.job_key(team_id, job_id)
    items = dynamo.call(lambda: list(RolloutWindow.query(key, scan_index_forward=not newest, limit=rules.MAX_SPAN)),
                        idempotent=True, what="watch windows")
    return [(int(i.window), _stats(i)) for i in items]


_baselines: dict[tuple[str, str], list[tuple[int, dict]]] = {}   # per warm container: first windows, once closed


def _first_windows(team_id: str, job_id: str, window: int) -> list[tuple[int, dict]]:
    """The job's first windows. Once the job is two windows past them no invocation adds to them
    any more, so a warm container keeps them instead of reading them again."""
    cached = _baselines.get((team_id, job_id))
    if cached is not None:
        return cached
    first = _windows(team_id, job_id, newest=False)
    if first and window > max(n for n, _ in first) + 1 and len(first) == rules.MAX_SPAN:
        if len(_baselines) > 10_000:
            _baselines.clear()
        _baselines[(team_id, job_id)] = first
    return first


def check(team_id: str, job_id: str, cfg: rules.Config, window: int) -> list[dict]:
    """Analyses the job's windows; raises (records and announces) the findings not raised before."""
    found = rules.analyse(_first_windows(team_id, job_id, window), _windows(team_id, job_id, newest=True))
    if not found:
        return []
    key = rollouts.job_key(team_id, job_id)
    raised = {f.finding_key for f in WatchFinding.query(key)}
    fresh = [f for f in found if f"{f['code']}#{f['severity']}" not in raised]
    if not fresh:
        return []
    try:
        job = Job.get(team_id, job_id, consistent_read=True)
    except DoesNotExist:
        return []
    out = []
    for finding in fresh:
        if _raise(job, cfg, finding, window):
            out.append(finding)
    return out


def _examples(team_id: str, job_id: str, finding: dict) -> list[dict]:
    """The example rollouts of a finding: the best-rewarded kept rollouts of its newest window (the
    worst, for grader errors)."""
    window = max(finding["evidence"]["windows"])
    items = Rollout.by_reward.query(rollouts.window_key(team_id, job_id, window),
                                    scan_index_forward=finding["code"] == "grader_errors", limit=3)
    return [{"id": r.rollout_id, "window": int(r.window), "reward": float(r.reward),
             "response_length": int(r.response_length), "errors": list(r.errors or [])} for r in items]


def _raise(job: Job, cfg: rules.Config, finding: dict, window: int) -> bool:
    team_id, job_id = job.team_id, job.job_id
    code, severity = finding["code"], finding["severity"]
    try:
        finding["evidence"]["examples"] = _examples(team_id, job_id, finding)
    except Exception:  # noqa: BLE001 - a finding without examples is still a finding
        finding["evidence"]["examples"] = []
    action = "cancel" if cfg.on_critical == "cancel" and severity == rules.CRITICAL else "alert"
    event_id = ids.stable_id("evt", team_id, job_id, "watch", code, severity)   # announced once
    now = ids.now()
    record = WatchFinding(rollouts.job_key(team_id, job_id), f"{code}#{severity}", code=code, severity=severity,
                          title=finding["title"], message=finding["message"], evidence=finding["evidence"],
                          window=window, action=action, event_id=event_id, created_at=now)
    event = outbox.stage(DETAIL_TYPE, team_id, event_id=event_id, job=job_record.summary(job), code=code,
                         severity=severity, title=finding["title"], message=finding["message"], window=window,
                         windows=finding["evidence"]["windows"], examples=finding["evidence"]["examples"],
                         action=action)
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.save(record, condition=WatchFinding.finding_key.does_not_exist())
            tx.save(event, condition=event.__class__.event_id.does_not_exist())
    except TransactWriteError:
        return False        # raised already (a concurrent invocation)
    level = "error" if severity == rules.CRITICAL else "warn"
    job_record.record_event(job, f"Training watch ({severity}): {finding['title']}. {finding['message']}", level=level,
                      source="rft-hub", data={"code": code, "severity": severity, "window": window, "action": action,
                                              "evidence": finding["evidence"]})
    outbox.publish([event])
    metrics.watch_finding(code, severity)
    if action == "cancel":
        job_record.request_stop(team_id, job_id, STOP_CODE,
                          f"The training watch found '{code}' ({severity}) and the job asked to be cancelled on a "
                          f"critical finding: {finding['message']}")
    if severity == rules.CRITICAL:
        _late_verdict(team_id, job_id)
    finding["action"] = action        # the hosted grader stops the job at once on a cancel
    logger.warning("training watch finding", extra={"job_id": job_id, "code": code, "severity": severity,
                                                    "action": action})
    return True


def verdict(job: Job) -> dict | None:
    """The watch's verdict on a finished job's model, from its critical findings (a consistent
    read: a finding is recorded before the stop it causes); the catalog keeps it on the model
    (inference/registry.py: quarantined, flagged or released)."""
    critical = [f for f in WatchFinding.query(rollouts.job_key(job.team_id, job.job_id), consistent_read=True)
                if f.severity == "critical"]
    stopped = bool(job.cancel_requested) and (job.error or {}).get("code") == STOP_CODE
    if not critical and not stopped:
        return None
    cancel = stopped or job.status != "succeeded" or any(f.action == "cancel" for f in critical)
    return {"state": registry.QUARANTINED if cancel else registry.FLAGGED,
            "on_critical": "cancel" if cancel else "alert", "job_id": job.job_id, "since": ids.now(),
            "findings": [{"code": f.code, "severity": f.severity, "title": f.title, "window": int(f.window),
                          "event_id": f.event_id} for f in critical]}


def _late_verdict(team_id: str, job_id: str) -> None:
    """A critical finding recorded after the job's model was registered (Bedrock finished first):
    the model takes the verdict now (the catalog never weakens one)."""
    try:
        job = Job.get(team_id, job_id, consistent_read=True)
        found = verdict(job) if job.fine_tuned_model else None
        if found is not None:
            registry.set_verdict(team_id, job.fine_tuned_model, found)
    except Exception:  # noqa: BLE001 - logged; the finding itself is recorded
        logger.exception("late watch verdict failed", extra={"job_id": job_id})


# ---- the watch endpoint -------------------------------------------------------------------------

def finding_view(f: WatchFinding) -> dict:
    return {"object": "fine_tuning.job.watch_finding", "code": f.code, "severity": f.severity, "title": f.title,
            "message": f.message, "window": int(f.window), "action": f.action, "evidence": f.evidence or {},
            "created_at": int(f.created_at), "event_id": f.event_id}


def _metrics_steps(job_id: str) -> dict[int, tuple[int, dict]]:
    """step -> (created_at, data) of the job's newest metrics events (one bounded query)."""
    out: dict[int, tuple[int, dict]] = {}
    for e in JobEvent.query(job_id, scan_index_forward=False, limit=METRICS_EVENTS_READ):
        data = e.data if isinstance(e.data, dict) else {}
        if e.type == "metrics" and isinstance(data.get("step"), int):
            out.setdefault(data["step"], (int(e.created_at), data))
    return out


def view(team_id: str, job_id: str, limit: int, after: str | None) -> dict:
    """The job's windows, oldest first, one page at a time (`after`: a window number or
    rft_next_cursor), with its findings and the watch's settings and thresholds."""
    job = job_record.get_job(team_id, job_id)    # another team's job is a 404
    key = rollouts.job_key(team_id, job_id)
    start = None
    if pagination.is_cursor(after):
        start = pagination.decode_cursor(after, RolloutWindow, hash_value=key)
    elif after:
        window = numbers.ascii_int(after)
        if window is None:
            raise InvalidRequest("after must be a window number or rft_next_cursor.", param="after")
        start = pagination.start_key(RolloutWindow, RolloutWindow(key, window))
    page = pagination.query(RolloutWindow, key, limit=limit, start=start, newest_first=False, what="watch windows")
    steps = _metrics_steps(job_id)
    aligned = rules.align_steps([{"window": int(w.window), "first_at": w.first_at, "last_at": w.last_at}
                                 for w in page.items], [(c, s) for s, (c, _) in steps.items()])
    series = []
    for w in page.items:
        step = aligned.get(int(w.window))
        entry = {"window": int(w.window), "invocations": int(w.invocations or 0), "first_at": w.first_at,
                 "last_at": w.last_at, "bedrock_step": step, **rules.window_view(_stats(w))}
        if step is not None:
            metrics = steps[step][1]
            entry["bedrock_metrics"] = {k: metrics.get(k) for k in ("critic_rewards_mean", "response_length_mean",
                                                                    "actor_entropy") if k in metrics}
        series.append(entry)
    cfg = rollouts.config(team_id, job_id) or rules.Config()
    findings = sorted((finding_view(f) for f in WatchFinding.query(key)), key=lambda f: (f["created_at"], f["code"]))
    return pagination.envelope(series, page, job_id=job.job_id, status=job.status, findings=findings,
                               watch={"on_critical": cfg.on_critical, "audit_grader": cfg.audit_ref is not None,
                                      "invocations_per_window": cfg.per_window,
                                      "windowing": "bedrock_steps_where_aligned_else_invocation_count"},
                               thresholds=rules.THRESHOLDS)
