"""The job record and its event log: views, reads, the event sequence and the best-reward note,
the judge cost and the watch's stop request on the job, and the job's Bedrock API. Training's ground
floor: the only training module the rest of the house reads (watch, hosted grader, rollouts,
evaluation, Slack).
"""
from __future__ import annotations

from pynamodb.exceptions import DoesNotExist, UpdateError

from chalicelib.adapters import bedrock
from chalicelib.domain import ids
from chalicelib.domain.nova import is_nova
from chalicelib.errors import NotFound
from chalicelib.store import dynamo
from chalicelib.store.models import Checkpoint, Job, JobEvent
from chalicelib.training import nova, rewards

ACTIVE = "active"


MAX_EVENT_PAGES = 50


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


def summary(job: Job) -> dict:
    return {"job_id": job.job_id, "bedrock_job_id": job.bedrock_job_id, "model": job.model,
            "suffix": job.suffix, "fine_tuned_model": job.fine_tuned_model, "error": job.error,
            "estimated_usd": (job.estimate or {}).get("estimated_usd")}


def next_seqs(job: Job, count: int) -> range:
    """Reserves `count` consecutive event sequence numbers (one atomic ADD)."""
    fresh = Job(job.team_id, job.job_id)
    fresh.update(actions=[Job.event_seq.add(count)])
    return range(fresh.event_seq - count + 1, fresh.event_seq + 1)


def save_event(job_id: str, seq: int, *, event_id: str, created_at: int, level: str, message: str,
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
    value = rewards.reward_of(data)
    if value is None or value <= _best_noted.get(job_id, float("-inf")):
        return
    summary = JobEvent(rewards.rewards_key(job_id), rewards.REWARDS_BEST)
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
    seq = next_seqs(job, 1)[0]
    save_event(job.job_id, seq, event_id=ids.new_id("ftevent"), created_at=ids.now(), level=level,
                message=message, type_=type_, data=data if data is not None else {}, source=source)


def upstream(job: Job):
    """The job's Bedrock API, picked by its model: the OpenAI-compatible Mantle endpoint
    (adapters/bedrock) or, for Amazon Nova, the native API (training/nova, same functions)."""
    return nova if is_nova(job.model) else bedrock.ProjectJobs(job.mantle_project)


def get_job(team_id: str, job_id: str) -> Job:
    try:
        return Job.get(team_id, job_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound(f"No fine-tuning job with id '{job_id}'.", param="fine_tuning_job_id") from None


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
