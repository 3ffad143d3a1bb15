"""Amazon Nova through Bedrock's native API: the family-specific half of a training job.

Jobs (training/record.py picks this module for a Nova model through `upstream`): `create_job`
writes the training rows to S3 and calls CreateModelCustomizationJob; `retrieve_job`,
`cancel_job`, `list_events` and `list_checkpoints` answer as the Mantle adapter does (OpenAI
shapes), so `apply_remote`, `sync_events` and the reconciler are the same for both families.
Events are the training metrics Bedrock writes to the output prefix (`metrics` events: the
reward curve); checkpoints: Bedrock's native API exposes none for RFT (only the final model).
A succeeded job's model is deployed by inference/deployments.py; it is served through
inference/converse.py.
"""
from __future__ import annotations

import json
import tempfile
import time

from chalicelib.adapters import aws
from chalicelib.adapters import bedrock_native as native
from chalicelib.adapters.bedrock import BedrockRejected
from chalicelib.config import settings
from chalicelib.domain import ids
from chalicelib.domain import nova as rules
from chalicelib.domain.datasets import iter_lines
from chalicelib.domain.graders import rows
from chalicelib.errors import NotFound, UpstreamError
from chalicelib.platform import files
from chalicelib.store.models import Job

PENDING = "pending"
DEPLOYMENT_EVENT = "rft-hub.model.deployment_changed"
METRICS_CACHE_SECONDS = 5.0


# ---- submission -------------------------------------------------------------------------------

def data_prefix(team_id: str, job_id: str) -> str:
    """The job's prefix in the datasets bucket: training data in, Bedrock's output under output/."""
    return f"nova/{team_id}/{job_id}/"


def _write_rows(job: Job, file_id: str, name: str) -> str:
    """The dataset as Bedrock reads it, in S3; every row carries rft-hub's grader fields (as the
    Mantle upload does: training/submit.py `_bedrock_file_id`). Returns its s3:// URI."""

    record = files.get_file(job.team_id, file_id)
    bucket, key = settings().datasets_bucket, data_prefix(job.team_id, job.job_id) + name
    with tempfile.TemporaryFile() as tmp:      # Lambda's /tmp holds files far larger than its memory
        for number, line in enumerate(iter_lines(files.open_content(record)), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if job.grader_ref:
                rows.stamp(row, job.grader_ref, job.team_id, job.job_id, number)
            tmp.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
        tmp.seek(0)
        aws.s3().upload_fileobj(tmp, bucket, key)
    return f"s3://{bucket}/{key}"


def create_job(job: Job) -> dict:
    """CreateModelCustomizationJob for a recorded Nova job, at most once (clientRequestToken is
    derived from the job: a retried submission gets the same Bedrock job). Returns the remote job
    as `retrieve_job` does."""
    role = settings().bedrock_service_role_arn
    if not role:
        raise BedrockRejected("rft-hub is not configured for Amazon Nova: RFT_BEDROCK_SERVICE_ROLE_ARN (the "
                              "service role Bedrock assumes) is not set.")
    method = job.bedrock_method or {}
    if "customizationConfig" not in method:
        raise BedrockRejected("This job was recorded without a native rftConfig; create it again.")
    try:
        training = _write_rows(job, job.training_file, "train.jsonl")
        validation = _write_rows(job, job.validation_file, "validation.jsonl") if job.validation_file else None
    except NotFound:
        raise
    except Exception as exc:  # noqa: BLE001 - S3 unavailable: the submission is retried (deferred)
        raise UpstreamError(f"Could not write the training data to S3: {type(exc).__name__}.") from None
    bucket = settings().datasets_bucket
    kwargs = {"jobName": rules.job_name(job.job_id), "customModelName": rules.custom_model_name(job.job_id),
              "roleArn": role, "baseModelIdentifier": job.model, "customizationType": method["customizationType"],
              "trainingDataConfig": {"s3Uri": training},
              "outputDataConfig": {"s3Uri": f"s3://{bucket}/{data_prefix(job.team_id, job.job_id)}output/"},
              "customizationConfig": method["customizationConfig"],
              "clientRequestToken": rules.request_token(job.team_id, job.job_id),
              "jobTags": [{"key": "rft-hub:team", "value": job.team_id}, {"key": "rft-hub:job", "value": job.job_id}]}
    if validation:
        kwargs["validationDataConfig"] = {"validators": [{"s3Uri": validation}]}
    arn = native.create_job(**kwargs)
    return {"id": arn, "status": "validating_files", "created_at": ids.now()}


# ---- the remote job, as the Mantle adapter answers -------------------------------------------------

def _remote(arn: str, found: dict) -> dict:
    remote: dict = {"id": arn, "status": rules.job_status(found)}
    if found.get("status") == "Completed" and found.get("outputModelArn"):
        base = (found.get("baseModelArn") or "").rsplit("/", 1)[-1] or arn.split("/")[-2]
        remote["fine_tuned_model"] = rules.tuned_model_id(base, found["outputModelArn"])
    if found.get("status") == "Failed":
        remote["error"] = {"code": "bedrock_failed", "message": found.get("failureMessage") or "Job failed.",
                           "param": None}
    return remote


def retrieve_job(bedrock_job_id: str) -> dict:
    return _remote(bedrock_job_id, native.get_job(bedrock_job_id))


def cancel_job(bedrock_job_id: str) -> dict:
    """StopModelCustomizationJob. The job is `Stopping` (still running) until Bedrock reports
    `Stopped` (an event, or the reconciler's poll) -- then it is cancelled."""
    try:
        native.stop_job(bedrock_job_id)
    except BedrockRejected:
        pass       # already finished (or stopping): its state says which
    return retrieve_job(bedrock_job_id)


def list_jobs(limit: int = 100, after: str | None = None) -> list[dict]:
    return []      # never needed: a retried create is deduplicated by its clientRequestToken


_metrics: dict[str, tuple[float, list[dict]]] = {}   # job ARN -> (read at, events oldest first)
_outputs: dict[str, str] = {}                        # job ARN -> output s3:// prefix (fixed at creation)


def _metrics_events(arn: str) -> list[dict]:
    """The job's training metrics CSV (under its output prefix) as metrics events, oldest first;
    read at most every few seconds per process (a sync pages through them)."""
    hit = _metrics.get(arn)
    if hit and time.monotonic() - hit[0] < METRICS_CACHE_SECONDS:
        return hit[1]
    if arn not in _outputs:
        _outputs[arn] = (native.get_job(arn).get("outputDataConfig") or {}).get("s3Uri") or ""
    uri = _outputs[arn]
    events: list[dict] = []
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        try:
            s3 = aws.s3()
            found = [o for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                     for o in page.get("Contents", []) if o["Key"].endswith(rules.METRICS_FILE)
                     and "validation_artifacts" not in o["Key"]]
            if found:
                newest = max(found, key=lambda o: o["LastModified"])
                text = s3.get_object(Bucket=bucket, Key=newest["Key"])["Body"].read().decode("utf-8", "replace")
                events = rules.metrics_events(arn, rules.parse_metrics_csv(text),
                                              int(newest["LastModified"].timestamp()))
        except Exception as exc:  # noqa: BLE001 - read again on the next sync
            raise UpstreamError(f"Could not read the job's training metrics from S3: {type(exc).__name__}.") from None
    if len(_metrics) > 1000:
        _metrics.clear()
    _metrics[arn] = (time.monotonic(), events)
    return events


def list_events(bedrock_job_id: str, limit: int = 100, after: str | None = None) -> list[dict]:
    """One page of the job's metrics events, newest first; `after` pages to older ones."""
    newest = list(reversed(_metrics_events(bedrock_job_id)))
    if after:
        at = next((i for i, e in enumerate(newest) if e["id"] == after), None)
        newest = newest[at + 1:] if at is not None else []
    return newest[:limit]


def list_checkpoints(bedrock_job_id: str, limit: int = 100) -> list[dict]:
    """Bedrock's native API exposes no intermediate checkpoints of an RFT job: only the final
    custom model (which rft-hub registers and deploys)."""
    return []
