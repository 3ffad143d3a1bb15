"""POST /v1/fine_tuning/jobs on the request path: checks, price, local preflight, the budget hold,
the conditional put of the record, `JobAccepted`, and the job worker's queue. Idempotent with
`Idempotency-Key`; never orphaned (the record is written before anything else).
"""
from __future__ import annotations

import hashlib
import json

from pynamodb.exceptions import DoesNotExist, PutError

from chalicelib import bus
from chalicelib.config import settings
from chalicelib.domain import ids, scopes
from chalicelib.domain import jobs as rules
from chalicelib.domain.datasets import MAX_ROWS, MIN_ROWS
from chalicelib.domain.events import JobAccepted
from chalicelib.domain.graders import calls_out, judge_models
from chalicelib.errors import Conflict, InvalidRequest, NotFound
from chalicelib.grading import graders, preflight
from chalicelib.grading.graders import PARAM
from chalicelib.inference import targets
from chalicelib.platform import files
from chalicelib.spend import budgets, prices
from chalicelib.store import dynamo
from chalicelib.store.models import File, Job
from chalicelib.training import watch
from chalicelib.training.record import ACTIVE, get_job, job_view, record_event
from chalicelib.training.submit import PREFLIGHT_ROWS, blocking, enqueue, record_preflight, release_hold


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


def _price(model: str):
    price = prices.price(model)
    if price is None:
        # Unpriced means refused, for training as for inference: a $0 hold is no budget at all.
        raise InvalidRequest(f"Model '{model}' has no price, so its training cannot be estimated or held "
                             "against the budget; an admin can set one with PUT /v1/admin/prices/{model}.",
                             param="model", code="model_not_priced")
    return price


def _estimate(team_id: str, price, report: dict, hyperparameters: dict, spec: dict) -> dict:
    return rules.estimate_cost(price, report.get("rows", 0), report.get("estimated_tokens", 0),
                               hyperparameters.get("n_epochs"), judges=_judge_prices(team_id, spec),
                               samples_per_prompt=hyperparameters.get("samples_per_prompt"))


def estimate_micro(team_id: str, req: rules.CreateJob) -> int:
    """What a job of this request would hold against the budget (a pipeline run holds it first)."""
    hyperparameters = rules.check_create(req, settings().rft_models + settings().nova_models)
    spec, _, _ = graders.resolve(team_id, req.method.reinforcement.grader)
    report = _training_file(team_id, req.training_file, "training_file", enforce_rows=True).validation or {}
    return int(_estimate(team_id, _price(req.model), report, hyperparameters, spec).get("estimated_micro_usd") or 0)


def _preflight(team_id: str, req: rules.CreateJob, spec: dict) -> dict:
    """The preflight of a grader that runs locally and cheaply, on the request path: a critical
    finding refuses the job (400) before it exists, unless the request says "warn"."""
    report = preflight.run(team_id, spec, req.training_file, PREFLIGHT_ROWS)
    refused = blocking(report, req.preflight)
    if refused:
        raise InvalidRequest(refused, param="method.reinforcement.grader", code="grader_preflight_failed")
    return report


def _judge_prices(team_id: str, spec: dict) -> list:
    """(price, output cap) of each LLM judge in the grader, priced as the gateway prices them."""

    return [(targets.priced(team_id, model, param)[1], cap) for model, param, cap in judge_models(spec, PARAM)]


def create_job(team_id: str, req: rules.CreateJob, raw_body: dict, idempotency_key: str | None, *,
               allowed=None) -> tuple[int, dict]:
    """Returns (HTTP status, job). `allowed`: the calling key's model list (None: any): the base
    model, the grader's judges and base-model sampling's model must be in it, each refused as a
    model the team cannot use is (the base model: 400 model_not_allowed, the list showing only
    what the key may train)."""
    trainable = tuple(m for m in settings().rft_models + settings().nova_models if scopes.model_allowed(allowed, m))
    hyperparameters = rules.check_create(req, trainable)
    spec, lambda_arn, grader_ref = graders.resolve(team_id, req.method.reinforcement.grader, allowed)
    audit_ref = watch.audit_ref(team_id, req.method.reinforcement.audit_grader, allowed)   # training watch (extra)
    training = _training_file(team_id, req.training_file, "training_file", enforce_rows=True)
    if req.validation_file:
        _training_file(team_id, req.validation_file, "validation_file", enforce_rows=False)

    request_hash = _request_hash(raw_body)
    job_id = ids.stable_id("ftjob", team_id, idempotency_key) if idempotency_key else ids.new_id("ftjob")
    try:
        existing = Job.get(team_id, job_id, consistent_read=True)   # a replay: no second preflight
    except DoesNotExist:
        existing = None
    if existing is None:   # e.g. the eval to run when it succeeds (evaluation/after_training.py)
        bus.emit(JobAccepted(team_id, job_id, req.rft_eval))
    price = _price(req.model)
    # Graders that call out (an LLM judge, a team Lambda) are preflighted by the job worker: on
    # this path they could take longer than API Gateway's 29 s.
    # So is base-model sampling (`sample_base`: metered model calls), its settings checked now.
    sample_base = req.sample_base.model_dump() if req.sample_base is not None else None
    if sample_base is not None and existing is None:
        preflight.check_base_plan(team_id, sample_base, allowed)
    deferred = calls_out(spec) or sample_base is not None
    checked = _preflight(team_id, req, spec) if existing is None and not deferred else None
    report = training.validation or {}
    now = ids.now()
    job = Job(team_id, job_id, status="validating_files", model=req.model, training_file=req.training_file,
              validation_file=req.validation_file, method=req.method.model_dump(mode="json", by_alias=True,
                                                                                exclude_none=True),
              bedrock_method=rules.bedrock_method(lambda_arn, hyperparameters, req.model), suffix=req.suffix,
              metadata=req.metadata, seed=req.seed, created_at=now, updated_at=now,
              estimate=_estimate(team_id, price, report, hyperparameters, spec),
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
            release_hold(held)
            if dynamo.response_code(exc) == "ValidationException":
                raise InvalidRequest("The job request is too large to store; "
                                     "shorten the grader or metadata.", param="method") from None
            raise
        existing = get_job(team_id, job_id)
        release_hold(held)                # a concurrent replay created it first, with its own hold
        if existing.request_hash != request_hash:
            raise Conflict("This Idempotency-Key was already used with a different request body.",
                           param="Idempotency-Key", code="idempotency_key_reused") from None
        if existing.submit_state == "pending":
            enqueue(existing)        # harmless if the first message is still queued: the worker is idempotent
        return 200, job_view(existing)
    watch.configure(team_id, job_id, req.watch.model_dump() if req.watch else None, audit_ref)
    record_event(job, f"Job created by rft-hub; estimated cost "
                      f"{job.estimate.get('estimated_usd') or 'unpriced'} USD.", source="rft-hub")
    if checked:
        record_preflight(job, checked)
    enqueue(job)
    return 200, job_view(job)
