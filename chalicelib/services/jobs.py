"""RFT jobs: create (idempotent, never orphaned), read, cancel, events and checkpoints.

Write order on create: the job record first (conditional put), then Bedrock, then
the record again. A crash in between leaves `submit_state` = pending/submitting,
which a retried create or the reconciler finishes (`submit`).
"""
from __future__ import annotations

import hashlib
import json
import tempfile


from pynamodb.exceptions import DoesNotExist, PutError, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.adapters import bedrock
from chalicelib.config import settings
from chalicelib.domain import ids
from chalicelib.domain import jobs as rules
from chalicelib.domain.datasets import MAX_ROWS, MIN_ROWS, iter_lines
from chalicelib.errors import ApiError, Conflict, InvalidRequest, NotFound
from chalicelib.log import logger
from chalicelib.services import budgets, files, graders, outbox, preflight, registry
from chalicelib.store.models import Checkpoint, File, Job, JobEvent, connection

ACTIVE = "active"
SUBMIT_LEASE_SECONDS = 120
MAX_EVENT_PAGES = 50


# ---- views -----------------------------------------------------------------------------------

def job_view(job: Job) -> dict:
    hp = job.method.get("reinforcement", {}).get("hyperparameters") or {}
    return {
        "id": job.job_id, "object": "fine_tuning.job", "created_at": job.created_at,
        "error": job.error, "fine_tuned_model": job.fine_tuned_model, "finished_at": job.finished_at,
        "hyperparameters": {k: hp.get(k, "auto") for k in ("batch_size", "learning_rate_multiplier", "n_epochs")},
        "model": job.model, "organization_id": job.team_id, "result_files": [],
        "seed": job.seed if job.seed is not None else 0, "status": job.status,
        "trained_tokens": job.trained_tokens, "training_file": job.training_file,
        "validation_file": job.validation_file, "estimated_finish": None, "integrations": None,
        "metadata": job.metadata, "method": job.method, "user_provided_suffix": job.suffix,
        # rft-hub extras
        "rft_team_id": job.team_id, "rft_bedrock_job_id": job.bedrock_job_id,
        "rft_submission": job.submit_state, "rft_cost_estimate": job.estimate,
        "rft_status_path": list(job.status_path or []), "rft_preflight": job.preflight,
    }


def event_view(e: JobEvent) -> dict:
    return {"id": e.event_id, "object": "fine_tuning.job.event", "created_at": e.created_at,
            "level": e.level, "message": e.message, "type": e.type, "data": e.data,
            "rft_source": e.source}


def checkpoint_view(c: Checkpoint) -> dict:
    return {"id": c.checkpoint_id, "object": "fine_tuning.job.checkpoint", "created_at": c.created_at,
            "fine_tuned_model_checkpoint": c.fine_tuned_model_checkpoint, "fine_tuning_job_id": c.job_id,
            "metrics": c.metrics or {}, "step_number": c.step_number}


# ---- create ----------------------------------------------------------------------------------

def _request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _training_file(team_id: str, file_id: str, param: str, enforce_rows: bool) -> File:
    try:
        record = files.get_file(team_id, file_id)
    except NotFound:
        raise NotFound(f"No such file: '{file_id}'.", param=param) from None
    rows = (record.validation or {}).get("rows", 0)
    if enforce_rows and not MIN_ROWS <= rows <= MAX_ROWS:
        raise InvalidRequest(f"Training file '{file_id}' has {rows} rows; Amazon Bedrock RFT needs "
                             f"{MIN_ROWS} to {MAX_ROWS}.", param=param, code="invalid_training_file")
    return record


PREFLIGHT_ROWS = 8


def _preflight(team_id: str, req: rules.CreateJob, spec: dict) -> dict:
    """A small preflight; a critical finding refuses the job unless the request says "warn"."""
    report = preflight.run(team_id, spec, req.training_file, PREFLIGHT_ROWS)
    critical = [f for f in report["findings"] if f["severity"] == "critical"]
    if critical and req.preflight == "block":
        listed = " ".join(f"[{f['code']}] {f['message']}" for f in critical)
        raise InvalidRequest(f"Grader preflight found problems: {listed} Fix the grader, or send "
                             "\"preflight\": \"warn\" to train anyway.", param="method.reinforcement.grader",
                             code="grader_preflight_failed")
    return report


def create_job(team_id: str, req: rules.CreateJob, raw_body: dict, idempotency_key: str | None) -> tuple[int, dict]:
    """Returns (HTTP status, job)."""
    hyperparameters = rules.check_create(req, settings().rft_models)
    spec, lambda_arn, grader_ref = graders.resolve(team_id, req.method.reinforcement.grader)
    training = _training_file(team_id, req.training_file, "training_file", enforce_rows=True)
    if req.validation_file:
        _training_file(team_id, req.validation_file, "validation_file", enforce_rows=False)

    request_hash = _request_hash(raw_body)
    job_id = ids.stable_id("ftjob", team_id, idempotency_key) if idempotency_key else ids.new_id("ftjob")
    try:
        existing = Job.get(team_id, job_id, consistent_read=True)   # a replay: no second preflight
    except DoesNotExist:
        existing = None
    checked = _preflight(team_id, req, spec) if existing is None else None
    report = training.validation or {}
    now = ids.now()
    job = Job(team_id, job_id, status="validating_files", model=req.model, training_file=req.training_file,
              validation_file=req.validation_file, method=req.method.model_dump(mode="json", by_alias=True,
                                                                                exclude_none=True),
              bedrock_method=rules.bedrock_method(lambda_arn, hyperparameters), suffix=req.suffix,
              metadata=req.metadata, seed=req.seed, created_at=now, updated_at=now,
              estimate=rules.estimate_cost(req.model, report.get("rows", 0), report.get("estimated_tokens", 0),
                                           hyperparameters.get("n_epochs")),
              request_hash=request_hash, submit_state="pending", active_shard=ACTIVE,
              status_path=["validating_files"], grader_ref=grader_ref, preflight=checked)
    if existing is None:
        # Training spend is held against the team budget like inference: 429 when it does not fit.
        held = budgets.reserve(team_id, job.estimate.get("estimated_micro_usd") or 0)
        job.budget_reserved_micro, job.budget_period = held.micro, held.period
    try:
        job.save(condition=Job.job_id.does_not_exist())
    except PutError as exc:
        if exc.cause_response_code != "ConditionalCheckFailedException":
            raise
        if existing is None:
            budgets.settle(held, 0)   # a concurrent replay created it first: release our hold
        existing = get_job(team_id, job_id)
        if existing.request_hash != request_hash:
            raise Conflict("This Idempotency-Key was already used with a different request body.",
                           param="Idempotency-Key", code="idempotency_key_reused") from None
        if existing.submit_state in ("pending", "submitting"):
            existing = submit(existing)
        return 200, job_view(existing)
    record_event(job, f"Job created by rft-hub; estimated cost "
                      f"{job.estimate.get('estimated_usd') or 'unpriced'} USD.", source="rft-hub")
    if checked and checked["findings"]:
        record_event(job, "Grader preflight: " + "; ".join(f"{f['severity']} {f['code']}" for f in checked["findings"]),
                     level="warn" if not checked["passed"] else "info", source="rft-hub", data=checked)
    job = submit(job)
    if job.submit_state == "rejected":
        raise InvalidRequest(f"{job.error['message']} (job {job.job_id} was recorded as failed)",
                             param=job.error.get("param"), code="bedrock_rejected")
    return 201, job_view(job)


def _acquire_lease(job: Job) -> bool:
    now = ids.now()
    try:
        job.update(actions=[Job.submit_state.set("submitting"),
                            Job.submit_lease_until.set(now + SUBMIT_LEASE_SECONDS),
                            Job.submit_attempts.add(1), Job.updated_at.set(now)],
                   condition=(Job.submit_state == "pending") |
                             ((Job.submit_state == "submitting") & (Job.submit_lease_until < now)))
        return True
    except UpdateError as exc:
        if exc.cause_response_code == "ConditionalCheckFailedException":
            return False
        raise


def _bedrock_file_id(team_id: str, file_id: str, grader_ref: str | None) -> str:
    """Uploads a dataset to Bedrock's Files API once per grader; later jobs reuse the id.

    For hosted graders every row carries `rft_grader_ref` (extra fields reach the reward
    Lambda), so the Lambda knows which grader applies.
    """
    record = files.get_file(team_id, file_id)
    key = grader_ref or ""
    if (record.bedrock_files or {}).get(key):
        return record.bedrock_files[key]
    # Lambda's /tmp holds files far larger than its memory; stream S3 -> disk -> Bedrock.
    with tempfile.TemporaryFile() as tmp:
        if grader_ref:
            for line in iter_lines(files.open_content(record)):
                if line.strip():
                    row = json.loads(line)
                    row[graders.REF_FIELD] = grader_ref
                    tmp.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
        else:
            for chunk in files.open_content(record):
                tmp.write(chunk)
        uploaded = bedrock.upload_file(tmp, record.filename)
    # Last writer wins: two jobs racing on one file at worst upload it twice.
    record.update(actions=[File.bedrock_files.set({**(record.bedrock_files or {}), key: uploaded["id"]})])
    return uploaded["id"]


def _adopt_orphan(job: Job, training_id: str) -> dict | None:
    """After an expired lease, Bedrock may already hold the job the crashed attempt created."""
    if not job.submit_attempts or job.submit_attempts < 2:
        return None
    for candidate in bedrock.list_jobs(limit=100):
        if candidate.get("training_file") == training_id and candidate.get("model") == job.model \
                and candidate.get("created_at", 0) >= job.created_at \
                and not list(Job.by_bedrock_id.query(candidate["id"])):
            return candidate
    return None


def submit(job: Job) -> Job:
    """Sends a recorded job to Bedrock, at most once (guarded by a lease)."""
    if not _acquire_lease(job):
        return get_job(job.team_id, job.job_id)
    try:
        training_id = _bedrock_file_id(job.team_id, job.training_file, job.grader_ref)
        validation_id = _bedrock_file_id(job.team_id, job.validation_file, job.grader_ref) \
            if job.validation_file else None
        remote = _adopt_orphan(job, training_id) or bedrock.create_job(
            model=job.model, training_file=training_id, validation_file=validation_id, method=job.bedrock_method)
    except bedrock.BedrockRejected as err:
        _fail_submission(job, err)
        return job
    except ApiError as err:
        # Throttled or unavailable after retries: release the lease; the reconciler resubmits.
        logger.warning("submission deferred", extra={"job_id": job.job_id, "error": err.message})
        job.update(actions=[Job.submit_state.set("pending"), Job.submit_lease_until.remove()],
                   condition=Job.submit_state == "submitting")
        record_event(job, "Amazon Bedrock is unavailable; submission will be retried.", level="warn",
                     source="rft-hub")
        return job
    job.update(actions=[Job.submit_state.set("submitted"), Job.bedrock_job_id.set(remote["id"]),
                        Job.submit_lease_until.remove(), Job.updated_at.set(ids.now())],
               condition=Job.submit_state == "submitting")
    record_event(job, f"Submitted to Amazon Bedrock as {remote['id']}.", source="rft-hub")
    apply_remote(job, remote, source="bedrock")
    if job.cancel_requested and job.status not in rules.TERMINAL:
        bedrock.cancel_job(remote["id"])
    return job


def _fail_submission(job: Job, err: ApiError) -> None:
    error = {"code": "bedrock_rejected", "message": err.message, "param": err.param}
    job.update(actions=[Job.submit_state.set("rejected"), Job.submit_lease_until.remove(), Job.error.set(error)],
               condition=Job.submit_state == "submitting")
    record_event(job, f"Amazon Bedrock rejected the job: {err.message}", level="error", source="rft-hub")
    apply_status(job, "failed", source="rft-hub", error=error)


# ---- state -----------------------------------------------------------------------------------

def _job_summary(job: Job) -> dict:
    return {"job_id": job.job_id, "bedrock_job_id": job.bedrock_job_id, "model": job.model,
            "suffix": job.suffix, "fine_tuned_model": job.fine_tuned_model, "error": job.error,
            "estimated_usd": (job.estimate or {}).get("estimated_usd")}


def apply_status(job: Job, observed: str, *, source: str, fine_tuned_model: str | None = None,
                 error: dict | None = None, trained_tokens: int | None = None) -> bool:
    """Applies one observed status: one conditional write, plus its outbound event in the same
    transaction. True if it changed the job. Used by requests, events and the reconciler alike."""
    target = rules.transition(job.status, observed)
    if target is None:
        return False
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
    summary = {**_job_summary(job), "fine_tuned_model": fine_tuned_model or job.fine_tuned_model,
               "error": error or job.error}
    event = outbox.stage("rft-hub.job.state_changed", job.team_id, previous_status=previous, status=target,
                         source=source, job=summary)
    try:
        with TransactWrite(connection=connection()) as tx:
            # Conditional on the status we read: a concurrent writer makes us re-read and re-decide.
            tx.update(job, actions=actions, condition=Job.status == previous)
            tx.save(event)
    except TransactWriteError as exc:
        reasons = [r.code for r in (exc.cancellation_reasons or []) if r is not None]
        if "ConditionalCheckFailed" not in reasons:
            raise
        job.refresh(consistent_read=True)
        return apply_status(job, observed, source=source, fine_tuned_model=fine_tuned_model,
                            error=error, trained_tokens=trained_tokens)
    job.refresh(consistent_read=True)
    record_event(job, f"Status {previous} -> {target}.", source=source, data={"from": previous, "to": target})
    outbox.publish([event])
    if target in rules.TERMINAL:
        finalize(job)
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
    if job.status == "succeeded" and registry.register(job) is None:
        return
    _settle_budget(job)
    job.update(actions=[Job.active_shard.remove()])


def _settle_budget(job: Job) -> None:
    """Once per job: a succeeded job spends its estimate (Bedrock publishes no actual training
    price); a failed or cancelled one releases its hold."""
    if job.budget_period is None or job.budget_settled:
        return
    estimate = (job.estimate or {}).get("estimated_micro_usd") or 0
    actual = estimate if job.status == "succeeded" else 0
    held = budgets.Reservation(job.team_id, job.budget_period, int(job.budget_reserved_micro or 0))
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.update(job, actions=[Job.budget_settled.set(True)], condition=Job.budget_settled.does_not_exist())
            budgets.settle_in(tx, held, actual)
    except TransactWriteError:
        return   # settled by a concurrent finalize
    budgets.announce_thresholds(held, actual)


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


def _next_seqs(job: Job, count: int) -> range:
    """Reserves `count` consecutive event sequence numbers (one atomic ADD)."""
    fresh = Job(job.team_id, job.job_id)
    fresh.update(actions=[Job.event_seq.add(count)])
    return range(fresh.event_seq - count + 1, fresh.event_seq + 1)


def _save_event(job_id: str, seq: int, *, event_id: str, created_at: int, level: str, message: str,
                type_: str, data: dict | None, source: str) -> None:
    JobEvent(job_id, f"{seq:012d}", event_id=event_id, created_at=created_at, level=level, message=message,
             type=type_, data=data, source=source).save()


def record_event(job: Job, message: str, *, source: str, level: str = "info", type_: str = "message",
                 data: dict | None = None) -> None:
    seq = _next_seqs(job, 1)[0]
    _save_event(job.job_id, seq, event_id=ids.new_id("ftevent"), created_at=ids.now(), level=level,
                message=message, type_=type_, data=data, source=source)


def get_job(team_id: str, job_id: str) -> Job:
    try:
        return Job.get(team_id, job_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound(f"No fine-tuning job with id '{job_id}'.", param="fine_tuning_job_id") from None


def refresh_from_bedrock(job: Job, *, force: bool = False) -> Job:
    """Polls Bedrock for a non-terminal submitted job (rate-limited per job)."""
    if job.status in rules.TERMINAL or not job.bedrock_job_id:
        return job
    if not force and ids.now() - (job.updated_at or 0) < settings().job_poll_min_seconds:
        return job
    try:
        remote = bedrock.retrieve_job(job.bedrock_job_id)
    except ApiError as err:  # reads degrade gracefully: show the last known state
        logger.warning("bedrock poll failed", extra={"job_id": job.job_id, "error": err.message})
        return job
    if not apply_remote(job, remote, source="poll"):
        job.update(actions=[Job.updated_at.set(ids.now())])
    return job


def retrieve(team_id: str, job_id: str) -> dict:
    return job_view(refresh_from_bedrock(get_job(team_id, job_id)))


def list_jobs(team_id: str, limit: int, after: str | None, metadata: dict[str, str] | None = None) -> dict:
    items = sorted(Job.query(team_id), key=lambda j: (j.created_at, j.job_id), reverse=True)
    if metadata:
        items = [j for j in items if all((j.metadata or {}).get(k) == v for k, v in metadata.items())]
    if after:
        idx = next((i for i, j in enumerate(items) if j.job_id == after), None)
        items = items[idx + 1:] if idx is not None else []
    return {"object": "list", "data": [job_view(j) for j in items[:limit]], "has_more": len(items) > limit}


def cancel(team_id: str, job_id: str) -> dict:
    job = get_job(team_id, job_id)
    if job.status == "cancelled":
        return job_view(job)  # idempotent
    if job.status in rules.TERMINAL:
        raise Conflict(f"Job '{job_id}' already {job.status}; only a running job can be cancelled.",
                       param="fine_tuning_job_id", code="job_finished")
    job.update(actions=[Job.cancel_requested.set(True), Job.updated_at.set(ids.now())])
    if job.bedrock_job_id:
        remote = bedrock.cancel_job(job.bedrock_job_id)
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


# ---- events and checkpoints (copied from Bedrock so reads do not depend on it) ---------------

def sync_events(job: Job) -> int:
    """Copies Bedrock events not yet stored, oldest first; returns how many were new."""
    if not job.bedrock_job_id:
        return 0
    seen = job.bedrock_event_cursor
    fresh: list[dict] = []
    after = None
    for _ in range(MAX_EVENT_PAGES):   # newest first, page by page, back to the last one copied
        page = bedrock.list_events(job.bedrock_job_id, limit=100, after=after)
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
    for seq, event in zip(_next_seqs(job, len(fresh)), fresh):
        _save_event(job.job_id, seq, event_id=event["id"], created_at=int(event.get("created_at") or ids.now()),
                    level=event.get("level") or "info", message=event.get("message") or "",
                    type_=event.get("type") or "message", data=event.get("data"), source="bedrock")
    # Conditional on the cursor we started from: a concurrent sync that won keeps its own copy.
    try:
        job.update(actions=[Job.bedrock_event_cursor.set(fresh[-1]["id"])],
                   condition=(Job.bedrock_event_cursor == seen) if seen else Job.bedrock_event_cursor.does_not_exist())
    except UpdateError as exc:
        if exc.cause_response_code != "ConditionalCheckFailedException":
            raise
    return len(fresh)


def list_events(team_id: str, job_id: str, limit: int, after: str | None) -> dict:
    job = get_job(team_id, job_id)
    if job.status not in rules.TERMINAL or not job.finished_at or ids.now() - job.finished_at < 600:
        try:
            sync_events(job)
        except ApiError as err:
            logger.warning("event sync failed", extra={"job_id": job_id, "error": err.message})
    items, seen_ids = [], set()
    for event in JobEvent.query(job_id, scan_index_forward=False):
        if event.event_id not in seen_ids:   # two concurrent syncs may both copy an event
            seen_ids.add(event.event_id)
            items.append(event)
    if after:
        idx = next((i for i, e in enumerate(items) if e.event_id == after), None)
        items = items[idx + 1:] if idx is not None else []
    return {"object": "list", "data": [event_view(e) for e in items[:limit]], "has_more": len(items) > limit}


def sync_checkpoints(job: Job) -> None:
    if not job.bedrock_job_id or job.status in ("validating_files", "queued"):
        return
    for ck in bedrock.list_checkpoints(job.bedrock_job_id):
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
    items = list(Checkpoint.query(job_id, scan_index_forward=False))
    if after:
        idx = next((i for i, c in enumerate(items) if c.checkpoint_id == after), None)
        items = items[idx + 1:] if idx is not None else []
    data = [checkpoint_view(c) for c in items[:limit]]
    return {"object": "list", "data": data, "has_more": len(items) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
