"""RFT jobs: create (idempotent, never orphaned), read, cancel, events and checkpoints.

Write order on create: the job record first (conditional put), then Bedrock, then
the record again. A crash in between leaves `submit_state` = pending/submitting,
which a retried create or the reconciler finishes (`submit`).
"""
from __future__ import annotations

import hashlib
import json
import tempfile


from pynamodb.exceptions import DoesNotExist, PutError, PynamoDBException, TransactWriteError, UpdateError
from pynamodb.expressions.operand import Path
from pynamodb.transactions import TransactWrite

from chalicelib.adapters import aws, bedrock
from chalicelib.config import jobs_queue, settings
from chalicelib.domain import ids
from chalicelib.domain import jobs as rules
from chalicelib.domain.datasets import MAX_ROWS, MIN_ROWS, iter_lines
from chalicelib.domain.graders import calls_out, judge_models
from chalicelib.services.graders import PARAM
from chalicelib.errors import ApiError, Conflict, InvalidRequest, NotFound
from chalicelib.log import logger
from chalicelib.services import budgets, files, graders, hosted_grader, outbox, preflight, prices, registry, watch
from chalicelib.services import nova, teams
from chalicelib.services.failures import retryable
from chalicelib.store import dynamo
from chalicelib.store import pagination
from chalicelib.store.models import Checkpoint, File, Job, JobEvent, connection

ACTIVE = "active"
SUBMIT_LEASE_SECONDS = 120
MAX_EVENT_PAGES = 50


# ---- views -----------------------------------------------------------------------------------

def _error_view(error: dict | None) -> dict | None:
    """A job's error as OpenAI's FineTuningJob has it: `code` and `message` strings, `param` a
    string or null (an upstream error may lack a code)."""
    if not error:
        return None
    param = error.get("param")
    return {**error, "code": str(error.get("code") or "error"), "message": str(error.get("message") or ""),
            "param": param if isinstance(param, str) else None}


def job_view(job: Job) -> dict:
    hp = job.method.get("reinforcement", {}).get("hyperparameters") or {}
    return {
        "id": job.job_id, "object": "fine_tuning.job", "created_at": job.created_at,
        # A job the training watch stopped shows no fine_tuned_model even when Bedrock made one
        # (OpenAI's cancelled jobs have none); rft_quarantined_model names it (issue #24).
        "error": _error_view(job.error), "finished_at": job.finished_at,
        "fine_tuned_model": job.fine_tuned_model if job.status == "succeeded" else None,
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
        "rft_quarantined_model": job.fine_tuned_model if job.status != "succeeded" else None,
    }


def event_view(e: JobEvent) -> dict:
    # `data` is an object in OpenAI's FineTuningJobEvent: events stored before it defaulted to {}
    # (rft-hub's own, written with data=None) are shown with {}.
    return {"id": e.event_id, "object": "fine_tuning.job.event", "created_at": e.created_at,
            "level": e.level, "message": e.message, "type": e.type or "message",
            "data": e.data if isinstance(e.data, dict) else {}, "rft_source": e.source}


def checkpoint_view(c: Checkpoint) -> dict:
    # The metrics Bedrock sent, and only those: a checkpoint copied through the SDK's typed object
    # carries every typed metric it lacks as null, which OpenAI's schema (numbers) does not allow.
    metrics = {k: v for k, v in (c.metrics or {}).items() if v is not None}
    return {"id": c.checkpoint_id, "object": "fine_tuning.job.checkpoint", "created_at": c.created_at,
            "fine_tuned_model_checkpoint": c.fine_tuned_model_checkpoint, "fine_tuning_job_id": c.job_id,
            "metrics": metrics, "step_number": c.step_number}


# ---- create ----------------------------------------------------------------------------------

def _request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _training_file(team_id: str, file_id: str, param: str, enforce_rows: bool) -> File:
    try:
        record = files.get_file(team_id, file_id, purpose=files.PURPOSE, param=param)   # never eval rows
    except NotFound:
        raise NotFound(f"No such file: '{file_id}'.", param=param) from None
    rows = (record.validation or {}).get("rows", 0)
    if enforce_rows and not MIN_ROWS <= rows <= MAX_ROWS:
        raise InvalidRequest(f"Training file '{file_id}' has {rows} rows; Amazon Bedrock RFT needs "
                             f"{MIN_ROWS} to {MAX_ROWS}.", param=param, code="invalid_training_file")
    return record


PREFLIGHT_ROWS = 8


def _blocking(report: dict, mode: str) -> str | None:
    """The message that refuses a job whose preflight found critical problems (mode "block")."""
    critical = [f for f in report["findings"] if f["severity"] == "critical"]
    if not critical or mode != "block":
        return None
    listed = " ".join(f"[{f['code']}] {f['message']}" for f in critical)
    return f"Grader preflight found problems: {listed} Fix the grader, or send \"preflight\": \"warn\" to train anyway."


def _preflight(team_id: str, req: rules.CreateJob, spec: dict) -> dict:
    """The preflight of a grader that runs locally and cheaply, on the request path: a critical
    finding refuses the job (400) before it exists, unless the request says "warn"."""
    report = preflight.run(team_id, spec, req.training_file, PREFLIGHT_ROWS)
    refused = _blocking(report, req.preflight)
    if refused:
        raise InvalidRequest(refused, param="method.reinforcement.grader", code="grader_preflight_failed")
    return report


def _judge_prices(team_id: str, spec: dict) -> list:
    """(price, output cap) of each LLM judge in the grader, priced as the gateway prices them."""
    from chalicelib.services import gateway

    return [(gateway.priced(team_id, model, param)[1], cap) for model, param, cap in judge_models(spec, PARAM)]


def create_job(team_id: str, req: rules.CreateJob, raw_body: dict, idempotency_key: str | None) -> tuple[int, dict]:
    """Returns (HTTP status, job)."""
    hyperparameters = rules.check_create(req, settings().rft_models + settings().nova_models)
    spec, lambda_arn, grader_ref = graders.resolve(team_id, req.method.reinforcement.grader)
    audit_ref = watch.audit_ref(team_id, req.method.reinforcement.audit_grader)   # training watch (extra)
    training = _training_file(team_id, req.training_file, "training_file", enforce_rows=True)
    if req.validation_file:
        _training_file(team_id, req.validation_file, "validation_file", enforce_rows=False)

    request_hash = _request_hash(raw_body)
    job_id = ids.stable_id("ftjob", team_id, idempotency_key) if idempotency_key else ids.new_id("ftjob")
    try:
        existing = Job.get(team_id, job_id, consistent_read=True)   # a replay: no second preflight
    except DoesNotExist:
        existing = None
    if existing is None and req.rft_eval is not None:   # the eval to run when it succeeds (services/evals.py)
        _evals().attach_to_job(team_id, job_id, req.rft_eval)
    price = prices.price(req.model)
    if price is None:
        # Unpriced means refused, for training as for inference: a $0 hold is no budget at all.
        raise InvalidRequest(f"Model '{req.model}' has no price, so its training cannot be estimated or held "
                             "against the budget; an admin can set one with PUT /v1/admin/prices/{model}.",
                             param="model", code="model_not_priced")
    # Graders that call out (an LLM judge, a team Lambda) are preflighted by the job worker: on
    # this path they could take longer than API Gateway's 29 s.
    # So is base-model sampling (`sample_base`: metered model calls), its settings checked now.
    sample_base = req.sample_base.model_dump() if req.sample_base is not None else None
    if sample_base is not None and existing is None:
        preflight.check_base_plan(team_id, sample_base)
    deferred = calls_out(spec) or sample_base is not None
    checked = _preflight(team_id, req, spec) if existing is None and not deferred else None
    report = training.validation or {}
    now = ids.now()
    job = Job(team_id, job_id, status="validating_files", model=req.model, training_file=req.training_file,
              validation_file=req.validation_file, method=req.method.model_dump(mode="json", by_alias=True,
                                                                                exclude_none=True),
              bedrock_method=rules.bedrock_method(lambda_arn, hyperparameters, req.model), suffix=req.suffix,
              metadata=req.metadata, seed=req.seed, created_at=now, updated_at=now,
              estimate=rules.estimate_cost(price, report.get("rows", 0), report.get("estimated_tokens", 0),
                                           hyperparameters.get("n_epochs"), judges=_judge_prices(team_id, spec),
                                           samples_per_prompt=hyperparameters.get("samples_per_prompt")),
              request_hash=request_hash, submit_state="pending", active_shard=ACTIVE,
              status_path=["validating_files"], grader_ref=grader_ref, preflight=checked,
              preflight_state="queued" if deferred else "done", preflight_mode=req.preflight,
              preflight_sample_base=sample_base)
    held = None
    if existing is None:
        # Training spend is held against the team budget like inference: 429 when it does not fit.
        # The hold is keyed by the job id, so a replayed create can never hold twice.
        held = budgets.reserve(team_id, job.estimate.get("estimated_micro_usd") or 0,
                               budgets.job_hold_id(job_id, ids.now_ms()))
        job.budget_reserved_micro, job.budget_period, job.budget_hold_id = held.micro, held.period, held.hold_id
    try:
        dynamo.call(lambda: job.save(condition=Job.job_id.does_not_exist()), idempotent=True, what="job create")
    except PutError as exc:
        if not dynamo.is_condition(exc):
            _release(held)
            if dynamo.response_code(exc) == "ValidationException":
                raise InvalidRequest("The job request is too large to store; "
                                     "shorten the grader or metadata.", param="method") from None
            raise
        existing = get_job(team_id, job_id)
        _release(held)                # a concurrent replay created it first, with its own hold
        if existing.request_hash != request_hash:
            raise Conflict("This Idempotency-Key was already used with a different request body.",
                           param="Idempotency-Key", code="idempotency_key_reused") from None
        if existing.submit_state == "pending":
            _enqueue(existing)        # harmless if the first message is still queued: the worker is idempotent
        return 200, job_view(existing)
    watch.configure(team_id, job_id, req.watch.model_dump() if req.watch else None, audit_ref)
    record_event(job, f"Job created by rft-hub; estimated cost "
                      f"{job.estimate.get('estimated_usd') or 'unpriced'} USD.", source="rft-hub")
    if checked:
        _record_preflight(job, checked)
    _enqueue(job)
    return 200, job_view(job)


# ---- the job worker: preflight that calls out, dataset preparation, submission -------------------

def _failure(exc: BaseException, what: str) -> dict:
    """The job's error for a failure that is not retried (never a traceback or a credential)."""
    if isinstance(exc, ApiError):
        return {"code": exc.code or "invalid_request", "message": exc.message, "param": exc.param}
    logger.exception("job step failed", extra={"step": what})
    return {"code": "internal_error", "message": f"rft-hub could not {what} ({type(exc).__name__}); the job's "
            "hold is released. Create the job again, or report it if it recurs.", "param": None}


def _enqueue(job: Job) -> None:
    """Hands the job to the worker. If the queue cannot be reached, the reconciler's next pass
    finds the job pending and does the same work: nothing is lost, only later."""
    try:
        sqs = aws.sqs()
        sqs.send_message(QueueUrl=sqs.get_queue_url(QueueName=jobs_queue())["QueueUrl"],
                         MessageBody=json.dumps({"team_id": job.team_id, "job_id": job.job_id}))
    except Exception as exc:  # noqa: BLE001 - see above
        logger.warning("job not queued; the reconciler will prepare it", extra={"job_id": job.job_id,
                                                                               "error": type(exc).__name__})


def _record_preflight(job: Job, report: dict) -> None:
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
    now = ids.now()
    try:
        job.update(actions=[Job.preflight_state.set("running"), Job.preflight_lease_until.set(
            now + PREFLIGHT_LEASE_SECONDS)],
                   condition=(Job.preflight_state == "queued") |
                             ((Job.preflight_state == "running") & (Job.preflight_lease_until < now)))
    except UpdateError as exc:
        if dynamo.is_condition(exc):
            return "preflight running elsewhere"
        raise
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
    refused = _blocking(report, job.preflight_mode or "block")
    if refused:
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
    _record_preflight(job, report)
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


def _release(held: budgets.Reservation | None) -> None:
    """Gives back a hold whose job was never recorded (never leave money held for nothing)."""
    if held is not None and held.hold_id:
        budgets.settle(held, 0)


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
        if dynamo.is_condition(exc):
            return False
        raise


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
                    row = json.loads(line)
                    row[graders.REF_FIELD] = grader_ref
                    row[hosted_grader.JOB_FIELD] = f"{team_id}/{job_id}"
                    own = row.get("id")
                    row[hosted_grader.PROMPT_FIELD] = own if isinstance(own, str) and own else f"line-{number}"
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
        if nova.handles(job.model):     # Amazon Nova: Bedrock's native API (services/nova.py)
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


# ---- state -----------------------------------------------------------------------------------

def _job_summary(job: Job) -> dict:
    return {"job_id": job.job_id, "bedrock_job_id": job.bedrock_job_id, "model": job.model,
            "suffix": job.suffix, "fine_tuned_model": job.fine_tuned_model, "error": job.error,
            "estimated_usd": (job.estimate or {}).get("estimated_usd")}


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
    summary = {**_job_summary(job), "fine_tuned_model": (fine_tuned_model or job.fine_tuned_model)
               if target == "succeeded" else None, "error": error or job.error}
    event = outbox.stage("rft-hub.job.state_changed", job.team_id, previous_status=previous, status=target,
                         source=source, job=summary, status_seq=len(job.status_path or []) + 1)
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
        model = registry.register(job)          # with the training watch's verdict (quarantined: never served)
        if model is None:
            return
    served = job.status == "succeeded" and not registry.quarantined(model)
    if served and nova.handles(job.model):
        nova.on_succeeded(job)        # its custom model's on-demand deployment (repeated until it is asked for)
    _settle_budget(job)
    if served:
        _evals().start_for_job(job)   # the request's rft_eval, if any; raises to be repeated when not queued
    job.update(actions=[Job.active_shard.remove()])


def _watch_stopped(job: Job) -> bool:
    """The training watch asked this job to stop (a critical finding, `on_critical: cancel`)."""
    return bool(job.cancel_requested) and (job.error or {}).get("code") == watch.STOP_CODE


def _evals():
    from chalicelib.services import evals   # evals imports this module

    return evals


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


def _next_seqs(job: Job, count: int) -> range:
    """Reserves `count` consecutive event sequence numbers (one atomic ADD)."""
    fresh = Job(job.team_id, job.job_id)
    fresh.update(actions=[Job.event_seq.add(count)])
    return range(fresh.event_seq - count + 1, fresh.event_seq + 1)


def _save_event(job_id: str, seq: int, *, event_id: str, created_at: int, level: str, message: str,
                type_: str, data: dict | None, source: str) -> None:
    if type_ == "metrics":
        _note_reward(job_id, data)   # first: a crash in between leaves the event to be copied again
    JobEvent(job_id, f"{seq:012d}", event_id=event_id, created_at=created_at, level=level, message=message,
             type=type_, data=data, source=source).save()


_best_noted: dict[str, float] = {}   # per warm process: the best reward already written, per job


def _note_reward(job_id: str, data: dict | None) -> None:
    """Raises the job's best reward (registry's reward summary item) if this metrics event beats
    it: one conditional write, made only when the value beats what this process last wrote, so a
    reader gets the best of any history with one GetItem. Idempotent (a max)."""
    value = registry.reward_of(data)
    if value is None or value <= _best_noted.get(job_id, float("-inf")):
        return
    summary = JobEvent(registry.rewards_key(job_id), registry.REWARDS_BEST)
    try:
        dynamo.call(lambda: summary.update(actions=[JobEvent.best_reward.set(value)],
                                           condition=JobEvent.best_reward.does_not_exist() |
                                           (JobEvent.best_reward < value)),
                    idempotent=True, what="job best reward")
    except UpdateError as exc:
        if not dynamo.is_condition(exc):
            raise
    if len(_best_noted) > 10_000:
        _best_noted.clear()
    _best_noted[job_id] = value


def record_event(job: Job, message: str, *, source: str, level: str = "info", type_: str = "message",
                 data: dict | None = None) -> None:
    seq = _next_seqs(job, 1)[0]
    _save_event(job.job_id, seq, event_id=ids.new_id("ftevent"), created_at=ids.now(), level=level,
                message=message, type_=type_, data=data if data is not None else {}, source=source)


def upstream(job: Job):
    """The job's Bedrock API, picked by its model: the OpenAI-compatible Mantle endpoint
    (adapters/bedrock) or, for Amazon Nova, the native API (services/nova, same functions)."""
    return nova if nova.handles(job.model) else bedrock.ProjectJobs(job.mantle_project)


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


def _list(view, page: pagination.Page, **extra) -> dict:
    return {"object": "list", "data": [view(i) for i in page.items], "has_more": page.has_more, **extra,
            "rft_next_cursor": page.cursor if page.has_more else None}


def _empty_list(**extra) -> dict:
    return {"object": "list", "data": [], "has_more": False, **extra, "rft_next_cursor": None}


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
        return _empty_list()
    if metadata:
        page = pagination.query(Job, team_id, index="by_created", limit=limit, start=start,
                                filter_condition=_metadata_filter(metadata),
                                keep=lambda j: all((j.metadata or {}).get(k) == v for k, v in metadata.items()),
                                page_size=METADATA_PAGE_SIZE, max_pages=METADATA_PAGES, what="job list")
    else:
        page = pagination.query(Job, team_id, index="by_created", limit=limit, start=start, what="job list")
    return _list(job_view, page)


def add_judge_cost(team_id: str, job_id: str, micro: int) -> None:
    """The judge calls a training job's grader made (each is on the ledger too), added up on the
    job once per reward invocation."""
    dynamo.call(lambda: Job(team_id, job_id).update(actions=[Job.judge_micro.add(micro)],
                                                    condition=Job.job_id.exists()),
                idempotent=False, what="job judge cost")


def request_stop(team_id: str, job_id: str, code: str, message: str) -> None:
    """rft-hub decides a job must stop (its budget ran out): the reason goes on the job now,
    once; the Bedrock cancel is made by the next request or reconciler pass that sees it."""
    error = {"code": code, "message": message, "param": None}
    try:
        dynamo.call(lambda: Job(team_id, job_id).update(
            actions=[Job.cancel_requested.set(True), Job.error.set(error), Job.updated_at.set(ids.now())],
            condition=Job.job_id.exists() & Job.error.does_not_exist()), idempotent=True, what="job stop")
    except UpdateError as exc:
        if dynamo.is_condition(exc):
            return            # already stopping (or gone)
        raise
    job = get_job(team_id, job_id)
    record_event(job, f"Stopping the job: {message}", level="error", source="rft-hub", data={"code": code})


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


# ---- events and checkpoints (copied from Bedrock so reads do not depend on it) ---------------

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
    for seq, event in zip(_next_seqs(job, len(fresh)), fresh):
        _save_event(job.job_id, seq, event_id=event["id"], created_at=int(event.get("created_at") or ids.now()),
                    level=event.get("level") or "info", message=event.get("message") or "",
                    type_=event.get("type") or "message", data=event.get("data"), source="bedrock")
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
        return _empty_list()
    seen_ids: set[str] = set()

    def first_copy(event: JobEvent) -> bool:
        # Two concurrent syncs may both copy a Bedrock event: shown once per page (the newest copy).
        fresh = event.event_id not in seen_ids
        seen_ids.add(event.event_id)
        return fresh

    page = pagination.query(JobEvent, job_id, limit=limit, start=start, keep=first_copy, what="job events")
    return _list(event_view, page)


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
        return _empty_list(first_id=None, last_id=None)
    page = pagination.query(Checkpoint, job_id, limit=limit, start=start, what="job checkpoints")
    data = [checkpoint_view(c) for c in page.items]
    return {"object": "list", "data": data, "has_more": page.has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
            "rft_next_cursor": page.cursor if page.has_more else None}
