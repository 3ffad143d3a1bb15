"""The job worker: preflight that calls out (under its lease), dataset preparation with rft-hub's
row fields, and submission to Bedrock under a lease, adopting a job a crashed attempt created.
Every failure is classified once (chalicelib/failures.py): retried, or the job fails and its hold
is released.
"""
from __future__ import annotations

import json
import tempfile

from pynamodb.exceptions import PynamoDBException, UpdateError

from chalicelib import metrics
from chalicelib.adapters import bedrock, queues
from chalicelib.config import jobs_queue
from chalicelib.domain import ids
from chalicelib.domain import jobs as rules
from chalicelib.domain.datasets import iter_lines
from chalicelib.domain.graders import rows
from chalicelib.domain.nova import is_nova
from chalicelib.errors import ApiError
from chalicelib.failures import retryable
from chalicelib.grading import graders, preflight
from chalicelib.log import logger
from chalicelib.platform import files, teams
from chalicelib.spend import budgets
from chalicelib.store import dynamo, lease
from chalicelib.store.models import File, Job
from chalicelib.training import nova
from chalicelib.training.record import get_job, record_event, upstream
from chalicelib.training.state import apply_remote, apply_status

PREFLIGHT_ROWS = 8


def blocking(report: dict, mode: str) -> str | None:
    """The message that refuses a job whose preflight found critical problems (mode "block")."""
    critical = [f for f in report["findings"] if f["severity"] == "critical"]
    if not critical or mode != "block":
        return None
    listed = " ".join(f"[{f['code']}] {f['message']}" for f in critical)
    return f"Grader preflight found problems: {listed} Fix the grader, or send \"preflight\": \"warn\" to train anyway."



SUBMIT_LEASE_SECONDS = 120


def _failure(exc: BaseException, what: str) -> dict:
    """The job's error for a failure that is not retried (never a traceback or a credential)."""
    if isinstance(exc, ApiError):
        return {"code": exc.code or "invalid_request", "message": exc.message, "param": exc.param}
    logger.exception("job step failed", extra={"step": what})
    return {"code": "internal_error", "message": f"rft-hub could not {what} ({type(exc).__name__}); the job's "
            "hold is released. Create the job again, or report it if it recurs.", "param": None}


def enqueue(job: Job) -> None:
    """Hands the job to the worker. If the queue cannot be reached, the reconciler's next pass
    finds the job pending and does the same work: nothing is lost, only later."""
    try:
        queues.send(jobs_queue(), json.dumps({"team_id": job.team_id, "job_id": job.job_id}))
    except Exception as exc:  # noqa: BLE001 - see above
        logger.warning("job not queued; the reconciler will prepare it", extra={"job_id": job.job_id,
                                                                               "error": type(exc).__name__})


def record_preflight(job: Job, report: dict) -> None:
    if report["findings"]:
        record_event(job, "Grader preflight: " + "; ".join(f"{f['severity']} {f['code']}" for f in report["findings"]),
                     level="warn" if not report["passed"] else "info", source="rft-hub", data=report)


PREFLIGHT_LEASE_SECONDS = 600


def prepare(team_id: str, job_id: str) -> str:
    """The worker's step for one job, safe to repeat (a redelivered message, the reconciler):
    the deferred preflight once (under a lease), then the submission (under its own lease)."""
    job = get_job(team_id, job_id)
    if job.status in rules.TERMINAL or job.submit_state not in ("pending", "submitting"):
        return "nothing to do"
    if job.preflight_state in ("queued", "running"):
        outcome = _deferred_preflight(job)
        if outcome != "passed":
            return outcome
    job = submit(job)
    return job.submit_state


def _deferred_preflight(job: Job) -> str:
    if not lease.take(job, Job.preflight_state, Job.preflight_lease_until, free="queued", taken="running",
                      seconds=PREFLIGHT_LEASE_SECONDS):
        return "preflight running elsewhere"
    # The lease is taken: from here every way out releases it or fails the job (never left held).
    try:
        # Inside: a judge retired since creation no longer resolves (a 4xx: the job cannot train).
        spec, _, _ = graders.resolve(job.team_id, job.method["reinforcement"]["grader"])
        report = preflight.run(job.team_id, spec, job.training_file, PREFLIGHT_ROWS,
                               sample_base=job.preflight_sample_base)
    except Exception as exc:  # noqa: BLE001 - classified once below
        if retryable(exc):
            _release_preflight(job)
            logger.warning("preflight deferred", extra={"job_id": job.job_id, "error": type(exc).__name__})
            return "preflight deferred"
        err = _failure(exc, "run the grader preflight")
        error = {"code": err["code"] or "grader_preflight_failed", "message": f"Grader preflight could not run: "
                 f"{err['message']}", "param": "method.reinforcement.grader"}
        _fail_before_bedrock(job, error, None)
        return "failed"
    refused = blocking(report, job.preflight_mode or "block")
    if refused:
        metrics.preflight_refusal()
        _fail_before_bedrock(job, {"code": "grader_preflight_failed", "message": refused,
                                   "param": "method.reinforcement.grader"}, report)
        return "failed"
    try:
        dynamo.call(lambda: job.update(actions=[Job.preflight.set(report), Job.preflight_state.set("done"),
                                                Job.preflight_lease_until.remove()]),
                    idempotent=True, what="preflight result")
    except (ApiError, PynamoDBException):
        _release_preflight(job)          # not recorded: run again, not after the lease ran out
        raise
    record_preflight(job, report)
    return "passed"


def _release_preflight(job: Job) -> None:
    """Gives the preflight lease back now (a throttle or an outage): the reconciler's next pass
    (or a redelivery) runs it again instead of waiting for the lease to run out."""
    try:
        dynamo.call(lambda: job.update(actions=[Job.preflight_state.set("queued"), Job.preflight_lease_until.remove()],
                                       condition=Job.preflight_state == "running"),
                    idempotent=True, what="preflight release")
    except (UpdateError, ApiError):
        pass          # the lease runs out by itself


def _fail_before_bedrock(job: Job, error: dict, report: dict | None) -> None:
    """Fails a job that never reached Bedrock; its budget hold is released when it finalizes."""
    actions = [Job.preflight_state.set("failed"), Job.preflight_lease_until.remove(),
               Job.submit_state.set("rejected"), Job.error.set(error)]
    if report is not None:
        actions.append(Job.preflight.set(report))
    try:
        job.update(actions=actions, condition=Job.submit_state == "pending")
    except UpdateError as exc:
        if dynamo.is_condition(exc):
            return            # cancelled meanwhile: nothing to fail
        raise
    record_event(job, error["message"], level="error", source="rft-hub", data=report)
    apply_status(job, "failed", source="rft-hub", error=error)


def release_hold(held: budgets.Reservation | None) -> None:
    """Gives back a hold whose job was never recorded (never leave money held for nothing)."""
    if held is not None and held.hold_id:
        budgets.settle(held, 0)


def _acquire_lease(job: Job) -> bool:
    return lease.take(job, Job.submit_state, Job.submit_lease_until, free="pending", taken="submitting",
                      seconds=SUBMIT_LEASE_SECONDS, extra=[Job.submit_attempts.add(1), Job.updated_at.set(ids.now())])


def _bedrock_file_id(team_id: str, file_id: str, grader_ref: str | None, job_id: str) -> str:
    """Uploads a dataset to Bedrock's Files API, once per job (every grader is hosted; a job
    recorded before that, without a grader ref, reuses the file's plain upload).

    Every row carries `rft_grader_ref`, `rft_job` and `rft_prompt` (extra fields reach the reward
    Lambda), so the hosted grader knows which grader applies, whose budget its judge calls are held
    to, and which prompt a rollout answers (the row's `id`, else its line: the training watch groups
    a prompt's samples by it, whatever ids Bedrock gives the rollouts).
    """
    record = files.get_file(team_id, file_id)
    project = teams.mantle_project(team_id, make=True)
    key = f"{grader_ref}#{job_id}" if grader_ref else ""
    if project:     # a file uploaded in another project (projects turned on later) is not this one's
        key = f"{project}/{key}"
    if (record.bedrock_files or {}).get(key):
        return record.bedrock_files[key]
    # Lambda's /tmp holds files far larger than its memory; stream S3 -> disk -> Bedrock.
    with tempfile.TemporaryFile() as tmp:
        if grader_ref:
            for number, line in enumerate(iter_lines(files.open_content(record)), start=1):
                if line.strip():
                    row = rows.stamp(json.loads(line), grader_ref, team_id, job_id, number)
                    tmp.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
        else:
            for chunk in files.open_content(record):
                tmp.write(chunk)
        uploaded = bedrock.upload_file(tmp, record.filename, project=project)
    # Last writer wins: two jobs racing on one file at worst upload it twice.
    record.update(actions=[File.bedrock_files.set({**(record.bedrock_files or {}), key: uploaded["id"]})])
    return uploaded["id"]


def _adopt_orphan(job: Job, training_id: str) -> dict | None:
    """After an expired lease, Bedrock may already hold the job the crashed attempt created."""
    if not job.submit_attempts or job.submit_attempts < 2:
        return None
    for candidate in bedrock.list_jobs(limit=100, project=teams.mantle_project(job.team_id, make=True)):
        if candidate.get("training_file") == training_id and candidate.get("model") == job.model \
                and candidate.get("created_at", 0) >= job.created_at \
                and not list(Job.by_bedrock_id.query(candidate["id"])):
            return candidate
    return None


def submit(job: Job) -> Job:
    """Sends a recorded job to Bedrock, at most once (guarded by a lease)."""
    if not _acquire_lease(job):
        return get_job(job.team_id, job.job_id)
    project = None
    try:
        if is_nova(job.model):     # Amazon Nova: Bedrock's native API (training/nova.py)
            remote = nova.create_job(job)
        else:
            project = teams.mantle_project(job.team_id, make=True)
            training_id = _bedrock_file_id(job.team_id, job.training_file, job.grader_ref, job.job_id)
            validation_id = _bedrock_file_id(job.team_id, job.validation_file, job.grader_ref, job.job_id) \
                if job.validation_file else None
            remote = _adopt_orphan(job, training_id) or bedrock.create_job(
                model=job.model, training_file=training_id, validation_file=validation_id, method=job.bedrock_method,
                project=project)
    except Exception as exc:  # noqa: BLE001 - classified once: retried, or the job fails (hold released)
        if not retryable(exc):
            # Not found (the job's own file deleted before submission), another 4xx, or a bug.
            _fail_submission(job, exc)
            return job
        # Throttled or unavailable after retries: release the lease; the reconciler resubmits.
        logger.warning("submission deferred", extra={"job_id": job.job_id, "error": type(exc).__name__})
        job.update(actions=[Job.submit_state.set("pending"), Job.submit_lease_until.remove()],
                   condition=Job.submit_state == "submitting")
        what = "Amazon Bedrock is unavailable" if isinstance(exc, ApiError) else "a service rft-hub needs is busy"
        record_event(job, f"{what}; submission will be retried.", level="warn", source="rft-hub")
        return job
    job.update(actions=[Job.submit_state.set("submitted"), Job.bedrock_job_id.set(remote["id"]),
                        *([Job.mantle_project.set(project)] if project else []),
                        Job.submit_lease_until.remove(), Job.updated_at.set(ids.now())],
               condition=Job.submit_state == "submitting")
    record_event(job, f"Submitted to Amazon Bedrock as {remote['id']}.", source="rft-hub")
    apply_remote(job, remote, source="bedrock")
    if job.cancel_requested and job.status not in rules.TERMINAL:
        upstream(job).cancel_job(remote["id"])
    return job


def _fail_submission(job: Job, exc: BaseException) -> None:
    if isinstance(exc, bedrock.BedrockRejected):
        error = {"code": "bedrock_rejected", "message": exc.message, "param": exc.param}
        event = f"Amazon Bedrock rejected the job: {exc.message}"
    else:
        error = _failure(exc, "submit the job")
        error["code"] = "submission_failed" if error["code"] != "internal_error" else error["code"]
        event = f"The job could not be submitted: {error['message']}"
    job.update(actions=[Job.submit_state.set("rejected"), Job.submit_lease_until.remove(), Job.error.set(error)],
               condition=Job.submit_state == "submitting")
    record_event(job, event, level="error", source="rft-hub")
    apply_status(job, "failed", source="rft-hub", error=error)
