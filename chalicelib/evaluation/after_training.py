"""The eval a fine-tuning job names (`rft_eval`): kept when the job is accepted, run when it succeeds
(one run on the base model, the tuned model and each checkpoint), reported when the runs end.
Both are reactions to training's events (chalicelib/wiring.py), never called by training."""
from __future__ import annotations

from pynamodb.exceptions import DoesNotExist, TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib import outbox
from chalicelib.domain import evals as rules
from chalicelib.domain import ids
from chalicelib.domain.events import JobAccepted, JobSucceeded
from chalicelib.errors import ApiError, InvalidRequest, NotFound, ServiceUnavailable
from chalicelib.evaluation.evals import apply_rules, create_run, get_eval, new_run_id, run_record
from chalicelib.platform import files
from chalicelib.store import dynamo
from chalicelib.store.models import Job, JobEvalLink, TunedModel, connection
from chalicelib.training import record as job_record

JOB_EVAL_KEYS = {"eval_id", "file_id", "input_messages", "sampling_params", "rft_max_usd"}


def on_job_accepted(event: JobAccepted) -> None:
    attach_to_job(event.team_id, event.job_id, event.rft_eval)


def on_job_succeeded(event: JobSucceeded) -> None:
    start_for_job(event.team_id, event.job_id)


def attach_to_job(team_id: str, job_id: str, spec: dict | None) -> None:
    """Job creation: checks the job's `rft_eval` and keeps it for when the job succeeds."""
    if spec is None:
        return
    if not isinstance(spec, dict) or not isinstance(spec.get("eval_id"), str):
        raise InvalidRequest("rft_eval must be {\"eval_id\": <eval id>} (optionally file_id, input_messages, "
                             "sampling_params, rft_max_usd).", param="rft_eval.eval_id")
    extra = sorted(set(spec) - JOB_EVAL_KEYS)
    if extra:
        raise InvalidRequest(f"Unknown field 'rft_eval.{extra[0]}'.", param=f"rft_eval.{extra[0]}")
    try:
        get_eval(team_id, spec["eval_id"])
    except NotFound as err:
        raise InvalidRequest(err.message, param="rft_eval.eval_id") from None
    apply_rules(rules.check_input_messages, spec.get("input_messages"), prefix="rft_eval")
    apply_rules(rules.check_sampling, spec.get("sampling_params"), prefix="rft_eval")
    if spec.get("file_id") is not None:
        try:
            files.get_file(team_id, spec["file_id"])
        except NotFound as err:
            raise InvalidRequest(err.message, param="rft_eval.file_id") from None
    if spec.get("rft_max_usd") is not None:
        apply_rules(rules.cap_micro, rules.CreateRun(data_source={}, rft_max_usd=spec["rft_max_usd"]), prefix="rft_eval")
    link = JobEvalLink(team_id, job_id, eval_id=spec["eval_id"], options=spec, created_at=ids.now())
    dynamo.call(link.save, idempotent=True, what="job eval")


def start_for_job(team_id: str, job_id: str) -> None:
    """A succeeded job's `rft_eval`: one run on the base model, the tuned model and each checkpoint.
    Idempotent (deterministic run ids); raises ServiceUnavailable when a run could not be queued,
    so the job's finalize is repeated by the reconciler."""

    try:
        link = dynamo.call(lambda: JobEvalLink.get(team_id, job_id, consistent_read=True), idempotent=True,
                           what="job eval")
    except DoesNotExist:
        return
    if link.enqueued:
        return
    job = job_record.get_job(team_id, job_id)
    try:
        get_eval(job.team_id, link.eval_id)
    except NotFound:
        job_record.record_event(job, f"Eval '{link.eval_id}' was deleted; it was not run on the tuned model.",
                          level="warn", source="rft-hub")
        link.update(actions=[JobEvalLink.enqueued.set(True), JobEvalLink.reported.set(True)])
        return
    targets = [("base", job.model), ("tuned", job.fine_tuned_model)]
    try:
        tuned = TunedModel.get(job.team_id, job.fine_tuned_model, consistent_read=True)
        targets += [("checkpoint", c["model"]) for c in tuned.checkpoints or []
                    if c.get("model") and c["model"] != job.fine_tuned_model]
    except DoesNotExist:
        pass
    options = link.options or {}
    source = {"type": "file_id", "id": options.get("file_id") or job.validation_file or job.training_file}
    created_ms = int(job.finished_at or ids.now()) * 1000
    run_ids, problems, unsent = dict(link.run_ids or {}), [], False
    for role, model in targets:
        data_source = {"type": "completions", "model": model, "source": source,
                       "input_messages": options.get("input_messages") or rules.DEFAULT_INPUT}
        if options.get("sampling_params"):
            data_source["sampling_params"] = options["sampling_params"]
        body = rules.CreateRun(name=f"{role}: {model}", metadata={"rft_job_id": job.job_id, "rft_role": role},
                               data_source=data_source, rft_max_usd=options.get("rft_max_usd"))
        run_id = new_run_id(created_ms, f"{job.team_id}/{job.job_id}/{model}")
        try:
            _, view = create_run(job.team_id, link.eval_id, body, None, job_id=job.job_id, role=role, run_id=run_id)
            run_ids[view["id"]] = role
            record = run_record(link.eval_id, view["id"])
            unsent = unsent or (record is not None and record.status == "queued" and not record.enqueued_at)
        except ApiError as err:
            problems.append(f"{role} model {model}: {err.message}")
    link.update(actions=[JobEvalLink.run_ids.set(run_ids), JobEvalLink.enqueued.set(not unsent)])
    if unsent:
        raise ServiceUnavailable("The eval worker's queue could not be reached; the job's eval runs wait.")
    message = f"Eval '{link.eval_id}' started on " + ", ".join(f"{role} ({rid})" for rid, role in run_ids.items())
    if problems:
        message += ". Not run: " + "; ".join(problems)
    job_record.record_event(job, message + ".", source="rft-hub", data={"eval_id": link.eval_id, "runs": run_ids})


def report_job(team_id: str, job_id: str) -> None:
    """When every run a job started has finished: the comparison (base vs tuned, and each checkpoint),
    once, as a job event and an outbound event."""

    try:
        link = JobEvalLink.get(team_id, job_id, consistent_read=True)
    except DoesNotExist:
        return
    if link.reported or not link.run_ids:
        return
    runs = {rid: run_record(link.eval_id, rid) for rid in link.run_ids}
    if any(r is not None and r.status not in rules.TERMINAL for r in runs.values()):
        return
    base = next((r for r in runs.values() if r is not None and r.role == "base"), None)
    rows = []
    for rid, r in runs.items():
        if r is None:
            continue
        rows.append({"run_id": rid, "role": r.role, "model": r.model, "status": r.status,
                     "mean_scores": rules.means(r.summary), "pass_rates": rules.pass_rates(r.summary),
                     "vs_base": rules.compare_summaries(base.summary, r.summary) if base is not None and r is not base
                     else None})
    comparison = {"eval_id": link.eval_id, "runs": rows}
    lines = []
    for row in rows:
        scores = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in row["mean_scores"].items())
        lines.append(f"{row['role']} {row['model']} ({row['status']}): {scores}")
    event = outbox.stage("rft-hub.eval.compared", team_id, job_id=job_id, **comparison)
    try:   # once: the flag and the outbound event in one transaction
        with TransactWrite(connection=connection()) as tx:
            tx.update(link, actions=[JobEvalLink.reported.set(True)], condition=JobEvalLink.reported == False)  # noqa: E712 - a PynamoDB condition, not a Python test
            tx.save(event)
    except TransactWriteError as exc:
        if dynamo.is_condition(exc):
            return                  # reported by a concurrent finish
        raise
    outbox.publish([event])
    try:
        job = Job.get(team_id, job_id, consistent_read=True)
        job_record.record_event(job, f"Eval '{link.eval_id}' comparison: " + " | ".join(lines), source="rft-hub",
                          data=comparison)
    except DoesNotExist:
        pass
