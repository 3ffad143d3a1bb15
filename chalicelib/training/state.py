"""The one transition (`apply_status`, `apply_remote`), finalize (copies, registration with the
training watch's verdict, deployment, settlement, `JobSucceeded`), polling, reads, lists, cancel
and the watch's stop enforced on Bedrock.
"""
from __future__ import annotations

import json

from pynamodb.exceptions import PynamoDBException, TransactWriteError, UpdateError
from pynamodb.expressions.operand import Path
from pynamodb.transactions import TransactWrite

from chalicelib import bus, metrics, outbox
from chalicelib.config import settings
from chalicelib.domain import ids
from chalicelib.domain import jobs as rules
from chalicelib.domain.events import JobEnded, JobSucceeded
from chalicelib.domain.nova import is_nova
from chalicelib.domain.pipelines import RUN_METADATA_KEY as PIPELINE_RUN_KEY
from chalicelib.errors import ApiError, Conflict, NotFound
from chalicelib.inference import deployments, registry
from chalicelib.log import logger
from chalicelib.spend import budgets
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import Job, connection
from chalicelib.training import rewards, watch
from chalicelib.training.mirror import sync_checkpoints, sync_events
from chalicelib.training.record import get_job, job_view, record_event, summary, upstream


def apply_status(job: Job, observed: str, *, source: str, fine_tuned_model: str | None = None,
                 error: dict | None = None, trained_tokens: int | None = None) -> bool:
    """Applies one observed status: one conditional write, plus its outbound event in the same
    transaction. True if it changed the job. Used by requests, events and the reconciler alike.

    The training watch's stop holds against the race (issue #24): a job it asked to stop that Bedrock
    finishes anyway ends `cancelled` (its model kept, quarantined, for the admin to release), and a
    `succeeded` write is conditional on no stop having been recorded since the job was read."""
    target = rules.transition(job.status, observed)
    if target is None:
        return False
    if target == "succeeded" and _watch_stopped(job):
        target = "cancelled"
    now = ids.now()
    actions = [Job.status.set(target), Job.updated_at.set(now), Job.last_event_at.set(now),
               Job.last_progress_at.set(now), Job.stalled_at.remove(),
               Job.status_path.set(Job.status_path.append([target]))]
    if target in rules.TERMINAL:
        actions.append(Job.finished_at.set(now))   # stays in the active index until finalized
    if fine_tuned_model:
        actions.append(Job.fine_tuned_model.set(fine_tuned_model))
    if error:
        actions.append(Job.error.set(error))
    if trained_tokens is not None:
        actions.append(Job.trained_tokens.set(trained_tokens))
    previous = job.status
    shown = {**summary(job), "fine_tuned_model": (fine_tuned_model or job.fine_tuned_model)
               if target == "succeeded" else None, "error": error or job.error}
    event = outbox.stage("rft-hub.job.state_changed", job.team_id, previous_status=previous, status=target,
                         source=source, job=shown, status_seq=len(job.status_path or []) + 1)
    condition = Job.status == previous
    if target == "succeeded" and not job.error:
        condition &= Job.error.does_not_exist()     # a stop recorded meanwhile: re-read, re-decide
    try:
        with TransactWrite(connection=connection()) as tx:
            # Conditional on the status we read: a concurrent writer makes us re-read and re-decide.
            tx.update(job, actions=actions, condition=condition)
            tx.save(event)
    except TransactWriteError as exc:
        reasons = [r.code for r in (exc.cancellation_reasons or []) if r is not None]
        if "ConditionalCheckFailed" not in reasons:
            raise
        job.refresh(consistent_read=True)
        return apply_status(job, observed, source=source, fine_tuned_model=fine_tuned_model,
                            error=error, trained_tokens=trained_tokens)
    job.refresh(consistent_read=True)
    metrics.job_transition(previous, target)
    record_event(job, f"Status {previous} -> {target}.", source=source, data={"from": previous, "to": target})
    outbox.publish([event])
    if target in rules.TERMINAL:
        try:
            finalize(job)
        except (ApiError, PynamoDBException) as exc:
            # The state change is committed; what is left (copies, registry, settlement) is
            # repeated by the reconciler until it completes. A read must not fail for it.
            logger.warning("finalize deferred to the reconciler", extra={"job_id": job.job_id,
                                                                         "error": type(exc).__name__})
    return True


def finalize(job: Job) -> None:
    """Last steps of a finished job: final copy of events and checkpoints, registry, and leaving
    the active index. Safe to repeat; the reconciler repeats it until it completes."""
    if job.status not in rules.TERMINAL or job.active_shard is None:
        return
    try:
        sync_events(job)
        sync_checkpoints(job)
    except NotFound:
        pass   # nothing left to copy on Bedrock's side
    except ApiError as err:
        logger.warning("final sync failed", extra={"job_id": job.job_id, "error": err.message})
        return
    model = None
    if job.status == "succeeded" or (job.fine_tuned_model and _watch_stopped(job)):
        # with its rewards and the training watch's verdict (quarantined: never served)
        model = registry.register(job, lambda: (*rewards.rewards(job.job_id), watch.verdict(job)))
        if model is None:
            return
    served = job.status == "succeeded" and not registry.quarantined(model)
    if served and is_nova(job.model):
        deployments.on_succeeded(job)        # its custom model's on-demand deployment (repeated until it is asked for)
    _settle_budget(job)
    if served:
        # the suffix alias, the request's rft_eval: handlers raise to be repeated (wiring.py)
        bus.emit(JobSucceeded(job.team_id, job.job_id))
    # e.g. a pipeline run waiting on this job (pipelines/steps.py)
    bus.emit(JobEnded(job.team_id, job.job_id, job.status, served,
                      (job.metadata or {}).get(PIPELINE_RUN_KEY)))
    job.update(actions=[Job.active_shard.remove()])


def _watch_stopped(job: Job) -> bool:
    """The training watch asked this job to stop (a critical finding, `on_critical: cancel`)."""
    return bool(job.cancel_requested) and (job.error or {}).get("code") == watch.STOP_CODE


def _settle_budget(job: Job) -> None:
    """Once per job: a succeeded job spends its estimate (Bedrock publishes no actual training
    price); a failed or cancelled one releases its hold. The hold settles at most once (keyed by
    the job id); a failure raises, so `finalize` stops and the reconciler tries again -- a
    settlement is retried, never skipped."""
    if job.budget_period is None or job.budget_settled:
        return
    estimate = (job.estimate or {}).get("estimated_micro_usd") or 0
    # A job Bedrock trained to the end spent its training, even if the watch then cancelled it.
    actual = estimate if job.status == "succeeded" or job.fine_tuned_model else 0
    held = budgets.Reservation(job.team_id, job.budget_period, int(job.budget_reserved_micro or 0),
                               job.budget_hold_id)
    budgets.settle(held, actual)
    dynamo.call(lambda: job.update(actions=[Job.budget_settled.set(True)]), idempotent=True,
                what="job settlement flag")


def apply_remote(job: Job, remote: dict, *, source: str) -> bool:
    observed = rules.normalise_status(remote.get("status"))
    if observed is None:
        logger.warning("unknown bedrock status", extra={"job_id": job.job_id, "status": remote.get("status")})
        return False
    err = remote.get("error")
    error = {"code": err.get("code"), "message": err.get("message"), "param": err.get("param")} \
        if isinstance(err, dict) and err.get("message") else None
    return apply_status(job, observed, source=source, fine_tuned_model=remote.get("fine_tuned_model"),
                        error=error, trained_tokens=remote.get("trained_tokens"))


def refresh_from_bedrock(job: Job, *, force: bool = False) -> Job:
    """Polls Bedrock for a non-terminal submitted job (rate-limited per job)."""
    if job.status in rules.TERMINAL or not job.bedrock_job_id:
        return job
    if not force and ids.now() - (job.updated_at or 0) < settings().job_poll_min_seconds:
        return job
    try:
        remote = upstream(job).retrieve_job(job.bedrock_job_id)
    except ApiError as err:  # reads degrade gracefully: show the last known state
        logger.warning("bedrock poll failed", extra={"job_id": job.job_id, "error": err.message})
        return job
    if not apply_remote(job, remote, source="poll"):
        job.update(actions=[Job.updated_at.set(ids.now())])
    return job


def retrieve(team_id: str, job_id: str) -> dict:
    return job_view(refresh_from_bedrock(get_job(team_id, job_id)))


# A `metadata` filter cannot know how many jobs it must read to find `limit` matches: each request
# reads at most METADATA_PAGES pages of METADATA_PAGE_SIZE jobs (1,000 items), then answers with the
# matches found so far, `has_more` and `rft_next_cursor` to go on from where it stopped.
METADATA_PAGE_SIZE = 100


METADATA_PAGES = 10


def _metadata_filter(metadata: dict[str, str]):
    """A DynamoDB filter narrowing a page to jobs whose stored metadata JSON contains each pair, as
    JSONAttribute writes it (json.dumps defaults); matches are re-checked exactly in Python."""
    condition = None
    for key, value in metadata.items():
        pair = Path("metadata").contains(json.dumps({key: value})[1:-1])
        condition = pair if condition is None else condition & pair
    return condition


def list_jobs(team_id: str, limit: int, after: str | None, metadata: dict[str, str] | None = None) -> dict:
    """Newest first, one bounded query on the `by_created` index: `after` is a job id (its
    created_at, from one GetItem, positions the query) or an rft_next_cursor."""
    start = pagination.resume_at(after, Job, hash_value=team_id, index="by_created",
                                 anchor=lambda job_id: dynamo.get_or_none(Job, team_id, job_id, what="job list"))
    if start is pagination.NOWHERE:
        return pagination.envelope([])
    if metadata:
        page = pagination.query(Job, team_id, index="by_created", limit=limit, start=start,
                                filter_condition=_metadata_filter(metadata),
                                keep=lambda j: all((j.metadata or {}).get(k) == v for k, v in metadata.items()),
                                page_size=METADATA_PAGE_SIZE, max_pages=METADATA_PAGES, what="job list")
    else:
        page = pagination.query(Job, team_id, index="by_created", limit=limit, start=start, what="job list")
    return pagination.envelope([job_view(i) for i in page.items], page)


def enforce_stop(job: Job) -> bool:
    """Cancels on Bedrock a running job rft-hub asked to stop. True if it sent the cancel."""
    if not job.cancel_requested or job.status in rules.TERMINAL or not job.bedrock_job_id:
        return False
    remote = upstream(job).cancel_job(job.bedrock_job_id)
    apply_remote(job, remote, source="rft-hub")
    return True


def cancel(team_id: str, job_id: str) -> dict:
    job = get_job(team_id, job_id)
    if job.status == "cancelled":
        return job_view(job)  # idempotent
    if job.status in rules.TERMINAL:
        raise Conflict(f"Job '{job_id}' already {job.status}; only a running job can be cancelled.",
                       param="fine_tuning_job_id", code="job_finished")
    job.update(actions=[Job.cancel_requested.set(True), Job.updated_at.set(ids.now())])
    if job.bedrock_job_id:
        remote = upstream(job).cancel_job(job.bedrock_job_id)
        apply_remote(job, remote, source="bedrock")
    elif job.submit_state == "pending":
        # Never reached Bedrock: cancelling is purely ours. Block a later submission first.
        try:
            job.update(actions=[Job.submit_state.set("cancelled")], condition=Job.submit_state == "pending")
            apply_status(job, "cancelled", source="rft-hub")
        except UpdateError:
            pass  # a submitter took the lease; it sees cancel_requested and cancels on Bedrock
    record_event(job, "Cancellation requested.", source="rft-hub")
    return job_view(get_job(team_id, job_id))
