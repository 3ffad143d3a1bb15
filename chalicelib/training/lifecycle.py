"""Job state from Bedrock: EventBridge events and the polling reconciler.

Both end in `job_state.apply_status`, the one transition function: idempotent, monotonic,
recorded with its source. Events are best effort: native (Amazon Nova) jobs emit them; AWS
documents none for OpenAI-compatible (Mantle) jobs, which converge through the reconciler
alone. The reconciler is what guarantees convergence; events only make it faster.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pynamodb.exceptions import TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib import metrics, outbox
from chalicelib.config import settings
from chalicelib.domain import ids
from chalicelib.domain import jobs as rules
from chalicelib.errors import ApiError, NotFound
from chalicelib.inference import deployments
from chalicelib.log import logger
from chalicelib.platform import files, teams
from chalicelib.spend import metering
from chalicelib.store.models import Job, connection
from chalicelib.training import mirror, record, submit
from chalicelib.training import state as job_state

DETAIL_TYPE = "Model Customization Job State Change"
MISSING_AFTER_SECONDS = 600


# ---- inbound EventBridge events -----------------------------------------------------------------

def _job_for(detail: dict) -> Job | None:
    # Mantle jobs are addressed by id; native ARNs end in the id (or "<base model>/<id>");
    # rft-hub records a native (Nova) job by its whole ARN.
    candidates = [detail.get("jobArn"), detail.get("jobName"), (detail.get("jobArn") or "").rsplit("/", 1)[-1]]
    for bedrock_id in filter(None, candidates):
        for hit in Job.by_bedrock_id.query(bedrock_id, limit=1):
            return Job.get(hit.team_id, hit.job_id, consistent_read=True)
    return None


def handle_bedrock_event(event: dict, account_id: str | None) -> str:
    """Applies one "Model Customization Job State Change". Never raises for bad input (a raise
    would make Lambda retry it); returns what happened, for logs and tests."""
    try:
        if event.get("source") != "aws.bedrock" or event.get("detail-type") != DETAIL_TYPE:
            return _drop("not a Bedrock job state change", event)
        if event.get("region") and event["region"] != settings().region:
            return _drop("other region", event)
        if account_id and event.get("account") and event["account"] != account_id:
            return _drop("other account", event)
        detail = event.get("detail")
        if not isinstance(detail, dict):
            return _drop("malformed detail", event)
        observed = rules.normalise_status(detail.get("jobStatus"))   # the field is jobStatus, not status
        if observed is None:
            return _drop(f"unknown jobStatus {detail.get('jobStatus')!r}", event)
        job = _job_for(detail)
        if job is None:
            return _drop("unknown job", event)
        if observed == "succeeded":
            # The event does not carry the OpenAI-compatible fine_tuned_model: ask Bedrock.
            try:
                remote = record.upstream(job).retrieve_job(job.bedrock_job_id)
            except ApiError as err:
                logger.warning("enrichment failed; the reconciler will finish", extra={"job_id": job.job_id,
                                                                                      "error": err.message})
                return "deferred"
            changed = job_state.apply_remote(job, remote, source="event")
        else:
            error = {"code": "bedrock_failed", "message": detail.get("failureMessage") or "Job failed.",
                     "param": None} if observed == "failed" else None
            changed = job_state.apply_status(job, observed, source="event", error=error)
        return "applied" if changed else "no-op"
    except Exception:  # noqa: BLE001 - a handler that raises is retried forever; log and drop
        logger.exception("bedrock event failed", extra={"event_id": event.get("id")})
        return "error"


def _drop(reason: str, event: dict) -> str:
    logger.warning("bedrock event dropped", extra={"reason": reason, "event_id": event.get("id")})
    return "dropped"


# ---- the reconciler -----------------------------------------------------------------------------

@dataclass
class RunReport:
    """Counters of one reconciler run (updated from worker threads through `add`)."""
    checked: int = 0
    changed: int = 0
    submitted: int = 0
    stalled: int = 0
    finalized: int = 0
    errors: int = 0
    skipped: int = 0
    published: int = 0
    seconds: float = 0.0
    problems: list = field(default_factory=list)
    money: dict = field(default_factory=dict)
    deployments: dict = field(default_factory=dict)      # Amazon Nova custom-model deployments
    projects_made: int = 0                               # teams' Mantle projects made late (issue #15)
    files_expired: int = 0                               # files deleted at their expires_at
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def view(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def _reconcile_one(team_id: str, job_id: str, report: RunReport) -> None:
    job = Job.get(team_id, job_id, consistent_read=True)
    report.add("checked")
    now = ids.now()
    if job.status in rules.TERMINAL:
        if job.submit_state in ("pending", "submitting"):   # cancelled before it was ever submitted
            job.update(actions=[Job.submit_state.set("cancelled")])
        job_state.finalize(job)
        report.add("finalized")
        return
    if job.submit_state == "rejected":
        job_state.apply_status(job, "failed", source="poll", error=job.error)
        report.add("changed")
        return
    if job.submit_state == "pending" or (job.submit_state == "submitting" and (job.submit_lease_until or 0) < now):
        outcome = submit.prepare(job.team_id, job.job_id)   # repairs "recorded, never prepared or submitted"
        report.add("submitted", int(outcome == "submitted"))
        return
    if not job.bedrock_job_id:
        return
    try:
        remote = record.upstream(job).retrieve_job(job.bedrock_job_id)
    except NotFound:
        # Bedrock no longer knows the job. Right after creation that can be lag; later it is final.
        if now - job.created_at > MISSING_AFTER_SECONDS:
            job_state.apply_status(job, "failed", source="poll", error={
                "code": "bedrock_job_missing", "param": None,
                "message": f"Amazon Bedrock no longer knows job {job.bedrock_job_id}."})
            report.add("changed")
        return
    if job_state.apply_remote(job, remote, source="poll"):
        report.add("changed")
    if job_state.enforce_stop(job):        # rft-hub asked it to stop (e.g. the budget ran out)
        report.add("changed")
    if mirror.sync_events(job):
        job.update(actions=[Job.last_progress_at.set(now), Job.stalled_at.remove()])
    if job.status == "running":
        mirror.sync_checkpoints(job)
    _flag_stall(job, now, report)


def _flag_stall(job: Job, now: int, report: RunReport) -> None:
    since = job.last_progress_at or job.created_at
    if job.status in rules.TERMINAL or job.stalled_at or now - since < settings().stall_seconds:
        return
    event = outbox.stage("rft-hub.job.stalled", job.team_id, job=record.summary(job), status=job.status,
                         no_progress_seconds=now - since)
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.update(job, actions=[Job.stalled_at.set(now)], condition=Job.stalled_at.does_not_exist())
            tx.save(event)
    except TransactWriteError:
        return   # flagged already (by a concurrent run)
    record.record_event(job, f"No progress for {now - since} s: job looks stalled.", level="warn", source="poll")
    outbox.publish([event])
    report.add("stalled")


def _repair(report: RunReport, name: str, step):
    """One of the pass's repairs: its result, or None and the failure on the report (the next
    run tries again)."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001 - the next run tries again
        report.add("errors")
        report.problems.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
        logger.warning("repair failed", extra={"step": name, "error": type(exc).__name__})
        return None


def _money(report: RunReport) -> None:
    """The ledger's repairs, in this order: dead-lettered entries into the ledger first (so
    their holds settle at their cost), then expired holds, then the daily totals."""
    for name, step in (("ledger_dead_letters", metering.drain_dead_letters),
                       ("expired_holds", metering.release_expired_holds),
                       ("usage_aggregated", metering.aggregate_all)):
        done = _repair(report, name, step)
        if done is not None:
            report.money[name] = done


def _deployments(report: RunReport) -> None:
    """Amazon Nova custom-model deployments: Creating -> Active | Failed, and what Bedrock refused."""

    report.deployments = _repair(report, "nova deployments", deployments.reconcile) or {}


def _projects(report: RunReport) -> None:
    """Teams whose Mantle project could not be made when they were created (Bedrock down)."""

    report.projects_made = _repair(report, "team projects", teams.ensure_projects) or 0


def _files(report: RunReport) -> None:
    """Files past their expires_after: S3 object and row deleted (already unreadable since expires_at)."""

    report.files_expired = _repair(report, "expired files", files.delete_expired) or 0


def _measure(report: RunReport) -> None:
    """The pass's metrics: one pass, what it repaired, what failed, the ledger dead letters left."""
    dead = report.money.get("ledger_dead_letters") or {}
    repaired = (report.changed + report.submitted + report.stalled + report.finalized + report.projects_made
                + sum(int(dead.get(k) or 0) for k in ("written", "parked")))
    metrics.reconciler_pass(repaired, report.errors)
    if "left" in dead:
        metrics.ledger_dlq_depth(int(dead.get("left") or 0))


def reconcile(deadline_s: float | None = None, concurrency: int | None = None) -> RunReport:
    """One pass over every non-terminal job (a query on the sparse `active` index), within a deadline."""
    started = time.monotonic()
    deadline = started + (deadline_s or settings().reconcile_deadline_seconds)
    report = RunReport()

    def work(key: Job) -> None:
        if time.monotonic() > deadline:
            report.add("skipped")   # picked up by the next run
            return
        try:
            _reconcile_one(key.team_id, key.job_id, report)
        except Exception as exc:  # noqa: BLE001 - one bad job must not stop the run
            report.add("errors")
            report.problems.append(f"{key.job_id}: {type(exc).__name__}: {exc}"[:300])
            logger.warning("reconcile failed", extra={"job_id": key.job_id, "error": type(exc).__name__})

    with ThreadPoolExecutor(max_workers=concurrency or settings().reconcile_concurrency) as pool:
        list(pool.map(work, Job.active.query(record.ACTIVE)))
    report.published = outbox.drain()
    _money(report)
    _deployments(report)
    _projects(report)
    _files(report)
    report.seconds = round(time.monotonic() - started, 3)
    _measure(report)
    logger.info("reconciled", extra={k: v for k, v in report.view().items() if k != "problems"})
    return report
