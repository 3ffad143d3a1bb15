"""The pipeline worker (issue #27): each message from the state machine names a step of a run and
carries its task token. A step is done here and answered (SendTaskSuccess / SendTaskFailure), or
left waiting with its token on the run (training, evaluation, a person's approval) for the job's
lifecycle, the eval worker, Slack or the reconciler to answer. Every step is idempotent: the state
machine sends a step again when its answer is lost, and SQS may deliver a message twice."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from chalicelib import outbox
from chalicelib.adapters import aws
from chalicelib.config import settings
from chalicelib.domain import evals as eval_rules
from chalicelib.domain import ids
from chalicelib.domain import jobs as job_rules
from chalicelib.domain import pipelines as rules
from chalicelib.domain.events import EvalRunEnded, JobEnded
from chalicelib.errors import ApiError, ServiceUnavailable
from chalicelib.evaluation import evals, promotion
from chalicelib.grading import graders, preflight
from chalicelib.inference import registry
from chalicelib.log import logger
from chalicelib.pipelines import runs, specs
from chalicelib.platform import files
from chalicelib.store import dynamo
from chalicelib.store.models import Alias, Job, OutboxEvent, PipelineRun, PipelineVersion, TunedModel
from chalicelib.training import create as job_create
from chalicelib.training import watch
from chalicelib.training.submit import PREFLIGHT_ROWS, blocking

WAIT = object()          # the step's answer comes later, from outside the run


class StepFailed(Exception):
    """The step cannot succeed (bad data, a preflight finding, a failed job ...): the run fails with it."""


def spec_of(run: PipelineRun) -> dict:
    found = dynamo.get_or_none(PipelineVersion, run.pipeline_id, int(run.pipeline_version), what="pipeline version")
    if found is None:
        raise StepFailed(f"the pipeline's version {run.pipeline_version} is gone")
    return found.spec


def handle(body: dict) -> str:
    """One step message. Raises only what should be retried (a busy store or service)."""
    step, token = body.get("step"), body.get("token")
    if step not in HANDLERS or not isinstance(token, str):
        logger.warning("unknown pipeline step message dropped", extra={"step": str(step)[:40]})
        return "dropped"
    run = runs.get_run(str(body.get("pipeline_id")), str(body.get("run_id")))
    if run is None:
        runs.send(token, error="rft.StepFailed", cause=json.dumps({"step": step, "message": "no such run"}))
        return "no-run"
    if run.status in rules.ENDINGS and step not in FINISHING:
        runs.send(token, error="rft.StepFailed", cause=json.dumps({"step": step, "message": f"the run is {run.status}"}))
        return "ended"
    if step not in FINISHING:
        runs.record_step(run, step, "running")
    try:
        result = HANDLERS[step](run, token, body)
    except StepFailed as failed:
        return _fail(run, step, token, str(failed))
    except ServiceUnavailable:
        raise                                 # busy: the message comes back
    except ApiError as err:                   # refused for good (bad data, no budget, a gate's 409 ...)
        return _fail(run, step, token, err.message)
    if result is WAIT:
        return "waiting"
    if step not in FINISHING:
        runs.record_step(run, step, "succeeded", result)
    runs.send(token, output=result)
    return "done"


def _fail(run: PipelineRun, step: str, token: str, message: str) -> str:
    runs.record_step(run, step, "failed", {"message": message})
    runs.send(token, error="rft.StepFailed", cause=json.dumps({"step": step, "message": message}))
    return "failed"


# ---- the steps -----------------------------------------------------------------------------------

def check_data(run: PipelineRun, token: str, body: dict) -> dict:
    """The run's data: the fixed file, or the newest JSONL under the prefix (made a file). Unchanged
    since the last successful run: the run is skipped. Otherwise its estimate is held."""
    spec = spec_of(run)
    p = specs.get(run.team_id, run.pipeline_id)
    data, content = run.data, None     # content: the upload's bytes when this attempt read them
    if data is None:
        if "file_id" in spec["dataset"]:
            record = files.get_file(run.team_id, spec["dataset"]["file_id"], purpose=files.PURPOSE)
            digest = hashlib.sha256()
            for chunk in files.open_content(record):
                digest.update(chunk)
            data = {"file_id": record.file_id, "sha256": digest.hexdigest(), "source": "file"}
        else:
            data, content = _newest_upload(run)
        runs.save_fields(run, [PipelineRun.data.set(data)])
        run.refresh(consistent_read=True)
    if data["sha256"] == p.last_data_sha256:
        return {"changed": False, "sha256": data["sha256"]}
    if data.get("file_id") is None:
        data = _register(run, data, content)
    req = job_rules.CreateJob.model_validate({**spec["job"], "training_file": data["file_id"]})
    runs.hold(run, job_create.estimate_micro(run.team_id, req))
    return {"changed": True, "file_id": data["file_id"], "sha256": data["sha256"]}


def _newest_upload(run: PipelineRun) -> tuple[dict, bytes]:
    s3, bucket = aws.s3(), settings().datasets_bucket
    where = specs.prefix(run.team_id, run.pipeline_id)
    newest = None
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=where):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".jsonl") and (newest is None or (obj["LastModified"], obj["Key"]) >
                                                  (newest["LastModified"], newest["Key"])):
                newest = obj
    if newest is None:
        raise StepFailed(f"no .jsonl under s3://{bucket}/{where} yet: upload one with POST "
                         f"/v1/pipelines/{run.pipeline_id}/uploads")
    if newest["Size"] > settings().max_file_bytes:
        raise StepFailed(f"{newest['Key']} is {newest['Size']} bytes; a training file is at most "
                         f"{settings().max_file_bytes}")
    content = s3.get_object(Bucket=bucket, Key=newest["Key"])["Body"].read()
    return ({"file_id": None, "key": newest["Key"], "sha256": hashlib.sha256(content).hexdigest(), "source": "prefix"},
            content)


def _register(run: PipelineRun, data: dict, content: bytes | None) -> dict:
    """The upload made a file: from the bytes this attempt hashed, or (a repeated step) read again."""
    if content is None:
        content = aws.s3().get_object(Bucket=settings().datasets_bucket, Key=data["key"])["Body"].read()
    if hashlib.sha256(content).hexdigest() != data["sha256"]:
        raise StepFailed(f"{data['key']} changed while the run read it; the next upload starts a new run")
    made = files.create_file(run.team_id, data["key"].rsplit("/", 1)[-1], files.PURPOSE, content)
    data = {**data, "file_id": made["id"], "rows": (made.get("rft_validation") or {}).get("rows")}
    runs.save_fields(run, [PipelineRun.data.set(data)])
    run.refresh(consistent_read=True)
    return data


def skip_unchanged(run: PipelineRun, token: str, body: dict) -> dict:
    runs.finish(run, "skipped_unchanged", error={"step": "check_data", "message": "the data is the same as the last "
                                                                                    "successful run's"})
    return {}


def check_preflight(run: PipelineRun, token: str, body: dict) -> dict:
    """The grader's preflight on the run's data; a critical finding stops the run before training
    (unless the job template says "preflight": "warn")."""
    job = spec_of(run)["job"]
    grader = job["method"].get("reinforcement", {}).get("grader")
    spec, _, _ = graders.resolve(run.team_id, grader)
    report = preflight.run(run.team_id, spec, run.data["file_id"], PREFLIGHT_ROWS, sample_base=job.get("sample_base"))
    refused = blocking(report, job.get("preflight", "block"))
    if refused:
        raise StepFailed(refused)
    return {"passed": report["passed"], "findings": [f["code"] for f in report["findings"]]}


def train(run: PipelineRun, token: str, body: dict) -> Any:
    """The job, made through the existing job path (its own hold replaces the run's); the step ends
    when the job does (`on_job_ended`, or the reconciler)."""
    job = spec_of(run)["job"]
    body_ = {**job, "training_file": run.data["file_id"],
             "metadata": {**(job.get("metadata") or {}), rules.RUN_METADATA_KEY: f"{run.pipeline_id}/{run.run_id}"}}
    runs.release(run)
    _, view = job_create.create_job(run.team_id, job_rules.CreateJob.model_validate(body_), body_,
                                    f"pipeline:{run.pipeline_id}:{run.run_id}")
    runs.wait_on(run, "train", token, [PipelineRun.job_id.set(view["id"])])
    advance(run)
    return WAIT


def evaluate(run: PipelineRun, token: str, body: dict) -> Any:
    """The pipeline's eval on the new model and on the alias's current one, as the gate pins it."""
    spec = spec_of(run)
    gate = spec["eval"]
    job = dynamo.get_or_none(Job, run.team_id, run.job_id, what="job", consistent_read=True)
    candidate = run.candidate_model or (job.fine_tuned_model if job else None)
    if not candidate:
        raise StepFailed("the job has no model to evaluate")
    alias = dynamo.get_or_none(Alias, run.team_id, spec["target_alias"], what="alias", consistent_read=True)
    current = alias.model_id if alias is not None and alias.model_id != candidate else None
    made = {}
    for role, model in (("candidate", candidate), ("current", current if gate["no_worse_than_current"] else None)):
        if model is None:
            continue
        pinned = gate["data_source"]
        request = eval_rules.CreateRun(
            name=f"pipeline {spec['name']} {role}", metadata={rules.RUN_METADATA_KEY: f"{run.pipeline_id}/{run.run_id}"},
            data_source={"type": "completions", "model": model,
                         "source": {"type": "file_id", "id": pinned["source"]["id"]},
                         "input_messages": pinned["input_messages"], "sampling_params": pinned["sampling_params"]})
        _, created = evals.create_run(run.team_id, gate["eval_id"], request, None, job_id=run.job_id,
                                      role=f"pipeline_{role}",
                                      run_id=evals.new_run_id(int(run.created_at) * 1000, f"{run.run_id}:{role}"))
        made[role] = created["id"]
    runs.wait_on(run, "evaluate", token, [PipelineRun.eval_runs.set(made), PipelineRun.candidate_model.set(candidate),
                                          PipelineRun.current_model.set(current)])
    advance(run)
    return WAIT


def gate(run: PipelineRun, token: str, body: dict) -> dict:
    spec_gate = spec_of(run)["eval"]
    found = {role: evals.run_record(spec_gate["eval_id"], rid) for role, rid in (run.eval_runs or {}).items()}
    candidate, current = found.get("candidate"), found.get("current")
    if candidate is None:
        raise StepFailed("the candidate's eval run is gone")
    failures, comparison = eval_rules.gate_failures(spec_gate, candidate.summary,
                                                    current.summary if current is not None else None)
    graded = int(((candidate.summary or {}).get("result_counts") or {}).get("total") or 0)
    if graded < int(spec_gate["min_items"]):
        failures.append(f"the candidate's run graded {graded} items; the gate needs {spec_gate['min_items']}")
    runs.save_fields(run, [PipelineRun.comparison.set(comparison)])
    run.refresh(consistent_read=True)
    return {"passed": not failures, "reasons": failures}


def gate_failed(run: PipelineRun, token: str, body: dict) -> dict:
    reasons = next((s.get("detail") or {} for s in reversed(run.steps or []) if s["name"] == "gate"), {})
    runs.finish(run, "gate_failed", error={"step": "gate", "message": "; ".join(reasons.get("reasons") or [])
                                           or "the gate did not pass"})
    return {}


def approval(run: PipelineRun, token: str, body: dict) -> Any:
    """Waits for a listed approver (Slack's buttons: slack/interactions.py); no answer by the
    pipeline's timeout is a reject (the state machine's timeout)."""
    spec = spec_of(run)
    runs.wait_on(run, "approval", token, [PipelineRun.status.set("awaiting_approval")])
    findings = _watch_summary(run)
    job = dynamo.get_or_none(Job, run.team_id, run.job_id, what="job") if run.job_id else None
    event = outbox.stage("rft-hub.pipeline.approval_requested", run.team_id, event_id=f"evt-{run.run_id}-approval",
                         pipeline_id=run.pipeline_id, pipeline_name=spec["name"], run_id=run.run_id,
                         target_alias=spec["target_alias"], candidate_model=run.candidate_model,
                         current_model=run.current_model, comparison=run.comparison, watch=findings,
                         cost_usd=(job.estimate or {}).get("estimated_usd") if job else None,
                         approvers=spec["approval"]["approvers"],
                         expires_at=ids.now() + int(spec["approval"]["timeout_seconds"]))
    if dynamo.put_once(event, OutboxEvent.event_id, what="approval request"):
        outbox.publish([event])
    return WAIT


def _watch_summary(run: PipelineRun) -> dict:
    if not run.job_id:
        return {}
    try:
        found = watch.view(run.team_id, run.job_id, 1, None).get("findings") or []
    except ApiError:
        return {}
    by = {}
    for f in found:
        by[f["severity"]] = by.get(f["severity"], 0) + 1
    return {"findings": by, "titles": [f["title"] for f in found][:5]}


def rejected(run: PipelineRun, token: str, body: dict) -> dict:
    error = body.get("error") or {}
    if error.get("Error") == "States.Timeout":
        message = "no approver decided in time: rejected"
    else:
        message = f"rejected by {(run.approval or {}).get('by') or 'an approver'}"
    runs.finish(run, "rejected", error={"step": "approval", "message": message})
    return {}


def promote(run: PipelineRun, token: str, body: dict) -> dict:
    """The alias moves through the existing gated move, the run named as who moved it."""
    spec = spec_of(run)
    moved = promotion.point_alias(run.team_id, spec["target_alias"], run.candidate_model,
                                  changed_by=f"pipeline:{run.pipeline_id}/run:{run.run_id}")
    runs.save_fields(run, [PipelineRun.alias_version.set(int(moved["rft_version"]))])
    return {"alias": spec["target_alias"], "version": int(moved["rft_version"]), "model": run.candidate_model}


def notify(run: PipelineRun, token: str, body: dict) -> dict:
    runs.finish(run, "succeeded")            # announced as rft-hub.pipeline.run_finished (Slack posts it)
    return {}


def failed(run: PipelineRun, token: str, body: dict) -> dict:
    error = body.get("error") or {}
    try:
        said = json.loads(error.get("Cause") or "")
    except ValueError:
        said = None
    # The step's own record first: the worker wrote it before answering (and moto's SendTaskFailure
    # drops the cause, which Step Functions keeps).
    recorded = next((st for st in reversed(run.steps or []) if st.get("status") == "failed"
                     and isinstance(st.get("detail"), dict) and st["detail"].get("message")), None)
    if isinstance(said, dict) and "message" in said:
        step, message = said.get("step"), said["message"]
    elif recorded is not None:
        step, message = recorded["name"], recorded["detail"]["message"]
    else:
        step = runs.current_step(run)
        message = f"{error.get('Error') or 'error'}: {error.get('Cause') or 'the step did not finish'}"
        if step:
            runs.record_step(run, step, "failed", {"message": message})
    runs.finish(run, "failed", error={"step": step, "message": message})
    return {}


HANDLERS = {"check_data": check_data, "skip_unchanged": skip_unchanged, "preflight": check_preflight,
            "train": train, "evaluate": evaluate, "gate": gate, "gate_failed": gate_failed, "approval": approval,
            "rejected": rejected, "promote": promote, "notify": notify, "failed": failed}
FINISHING = ("skip_unchanged", "gate_failed", "rejected", "notify", "failed")


# ---- what answers a waiting step ------------------------------------------------------------------

def advance(run: PipelineRun) -> bool:
    """Answers the run's waiting step when what it waits for has ended (a job, eval runs)."""
    if run.waiting_step == "train" and run.job_id:
        job = dynamo.get_or_none(Job, run.team_id, run.job_id, what="job", consistent_read=True)
        if job is None or job.status not in job_rules.TERMINAL:
            return False
        model = dynamo.get_or_none(TunedModel, run.team_id, job.fine_tuned_model, what="tuned model",
                                   consistent_read=True) if job.fine_tuned_model else None
        if job.status == "succeeded" and model is not None and not registry.quarantined(model):
            runs.save_fields(run, [PipelineRun.candidate_model.set(model.model_id)])
            return runs.complete(run, "train", output={"job_id": job.job_id, "model": model.model_id})
        if job.status == "succeeded" and model is None:
            return False                    # its finalize has not registered the model yet
        reason = (job.error or {}).get("message") or ("the training watch quarantined its model"
                                                      if job.status == "succeeded" else job.status)
        return runs.complete(run, "train", error="rft.StepFailed", cause=json.dumps(
            {"step": "train", "message": f"job {job.job_id} ended {job.status}: {reason}"}))
    if run.waiting_step == "evaluate" and run.eval_runs:
        eval_id = spec_of(run)["eval"]["eval_id"]
        found = {role: evals.run_record(eval_id, rid) for role, rid in run.eval_runs.items()}
        if any(r is None or r.status not in eval_rules.TERMINAL for r in found.values()):
            return False
        bad = [f"{role} run {r.run_id} {r.status}" for role, r in found.items() if r.status != "completed"]
        if bad:
            return runs.complete(run, "evaluate", error="rft.StepFailed",
                                 cause=json.dumps({"step": "evaluate", "message": "; ".join(bad)}))
        return runs.complete(run, "evaluate", output={role: r.run_id for role, r in found.items()})
    return False


def on_job_ended(event: JobEnded) -> None:
    run = runs.run_of(event.pipeline_run)
    if run is not None and run.job_id == event.job_id:
        advance(run)


def on_eval_run_ended(event: EvalRunEnded) -> None:
    run = runs.run_of(event.pipeline_run)
    if run is not None:
        advance(run)
