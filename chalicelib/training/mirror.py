"""Bedrock's events and checkpoints copied into rft-hub's tables (so reads never depend on Bedrock)
and listed.
"""
from __future__ import annotations

from pynamodb.exceptions import UpdateError

from chalicelib import metrics
from chalicelib.domain import ids
from chalicelib.domain import jobs as rules
from chalicelib.errors import ApiError
from chalicelib.log import logger
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import Checkpoint, Job, JobEvent
from chalicelib.training.record import (
    MAX_EVENT_PAGES,
    checkpoint_view,
    event_view,
    get_job,
    next_seqs,
    save_event,
    upstream,
)


def sync_events(job: Job) -> int:
    """Copies Bedrock events not yet stored, oldest first; returns how many were new."""
    if not job.bedrock_job_id:
        return 0
    seen = job.bedrock_event_cursor
    fresh: list[dict] = []
    after = None
    for _ in range(MAX_EVENT_PAGES):   # newest first, page by page, back to the last one copied
        page = upstream(job).list_events(job.bedrock_job_id, limit=100, after=after)
        ids_ = [e["id"] for e in page]
        if seen in ids_:
            fresh.extend(page[:ids_.index(seen)])
            break
        fresh.extend(page)
        if len(page) < 100:
            break
        after = ids_[-1]
    if not fresh:
        return 0
    fresh.reverse()
    for seq, event in zip(next_seqs(job, len(fresh)), fresh):
        created_at = int(event.get("created_at") or ids.now())
        save_event(job.job_id, seq, event_id=event["id"], created_at=created_at,
                    level=event.get("level") or "info", message=event.get("message") or "",
                    type_=event.get("type") or "message", data=event.get("data"), source="bedrock")
        if event.get("type") == "metrics":
            metrics.training_step(job.job_id, job.model, event.get("data"), at=created_at)
    # Conditional on the cursor we started from: a concurrent sync that won keeps its own copy.
    try:
        job.update(actions=[Job.bedrock_event_cursor.set(fresh[-1]["id"])],
                   condition=(Job.bedrock_event_cursor == seen) if seen else Job.bedrock_event_cursor.does_not_exist())
    except UpdateError as exc:
        if not dynamo.is_condition(exc):
            raise
    return len(fresh)


def list_events(team_id: str, job_id: str, limit: int, after: str | None) -> dict:
    job = get_job(team_id, job_id)
    if job.status not in rules.TERMINAL or not job.finished_at or ids.now() - job.finished_at < 600:
        try:
            sync_events(job)
        except ApiError as err:
            logger.warning("event sync failed", extra={"job_id": job_id, "error": err.message})
    start = pagination.resume_at(after, JobEvent, hash_value=job_id, anchor=lambda eid: _event_anchor(job_id, eid))
    if start is pagination.NOWHERE:
        return pagination.envelope([])
    seen_ids: set[str] = set()

    def first_copy(event: JobEvent) -> bool:
        # Two concurrent syncs may both copy a Bedrock event: shown once per page (the newest copy).
        fresh = event.event_id not in seen_ids
        seen_ids.add(event.event_id)
        return fresh

    page = pagination.query(JobEvent, job_id, limit=limit, start=start, keep=first_copy, what="job events")
    return pagination.envelope([event_view(i) for i in page.items], page)


def _event_anchor(job_id: str, event_id: str) -> JobEvent | None:
    """Where `after=<event id>` resumes: the event, from the keys-only `by_event_id` index (ids
    are unique per job; a Bedrock id copied twice resumes after its newest copy)."""
    found = dynamo.call(lambda: [e for e in JobEvent.query(event_id, index_name="by_event_id", limit=10)
                                 if e.job_id == job_id], idempotent=True, what="job events")
    return max(found, key=lambda e: e.sort_key) if found else None


def sync_checkpoints(job: Job) -> None:
    if not job.bedrock_job_id or job.status in ("validating_files", "queued"):
        return
    for ck in upstream(job).list_checkpoints(job.bedrock_job_id):
        step = int(ck.get("step_number") or 0)
        Checkpoint(job.job_id, f"{step:08d}#{ck['id']}", checkpoint_id=ck["id"], step_number=step,
                   created_at=int(ck.get("created_at") or ids.now()),
                   fine_tuned_model_checkpoint=ck.get("fine_tuned_model_checkpoint") or "",
                   metrics=ck.get("metrics") or {}).save()


def list_checkpoints(team_id: str, job_id: str, limit: int, after: str | None) -> dict:
    job = get_job(team_id, job_id)
    try:
        sync_checkpoints(job)
    except ApiError as err:
        logger.warning("checkpoint sync failed", extra={"job_id": job_id, "error": err.message})
    def anchor(checkpoint_id: str) -> Checkpoint | None:
        # Where `after=<checkpoint id>` resumes: the checkpoint, from the keys-only `by_checkpoint_id` index.
        found = dynamo.call(lambda: [c for c in Checkpoint.query(checkpoint_id, index_name="by_checkpoint_id",
                                                                 limit=10) if c.job_id == job_id],
                            idempotent=True, what="job checkpoints")
        return max(found, key=lambda c: c.step_key) if found else None

    start = pagination.resume_at(after, Checkpoint, hash_value=job_id, anchor=anchor)
    if start is pagination.NOWHERE:
        return pagination.envelope([], first_last=None)
    page = pagination.query(Checkpoint, job_id, limit=limit, start=start, what="job checkpoints")
    data = [checkpoint_view(c) for c in page.items]
    return pagination.envelope(data, page, first_last=None)
