"""Pipelines (issue #27): a team's pipelines, versioned (each change is a new version, as saved
graders are), their schedules (EventBridge Scheduler) and the presigned upload of new data under
a pipeline's own prefix. Runs: pipelines/runs.py."""
from __future__ import annotations

import json
import secrets
from typing import Any

from botocore.exceptions import ClientError
from pydantic import ValidationError
from pynamodb.exceptions import DeleteError, TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib.adapters import aws, queues
from chalicelib.config import (
    pipeline_schedule_group,
    pipeline_scheduler_role_arn,
    pipeline_triggers_queue,
    settings,
)
from chalicelib.domain import ids, scopes
from chalicelib.domain import jobs as job_rules
from chalicelib.domain import pipelines as rules
from chalicelib.errors import ApiError, Conflict, InvalidRequest, NotFound
from chalicelib.evaluation import gates
from chalicelib.grading import graders
from chalicelib.log import logger
from chalicelib.platform import files
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import PipelineRecord, PipelineVersion, connection

PLACEHOLDER_FILE = "file-pipeline-data"   # a job template is checked as a job body with this training file
UPLOAD_URL_SECONDS = 900


def prefix(team_id: str, pipeline_id: str) -> str:
    """Where a pipeline's new data is uploaded (S3's EventBridge notifications start a run)."""
    return f"incoming/{team_id}/{pipeline_id}/"


def _under(err: ApiError, prefix_: str, renamed: tuple[str, str] | None = None) -> InvalidRequest:
    param = err.param or ""
    if renamed and param.startswith(renamed[0]):
        param = renamed[1] + param[len(renamed[0]):]
    elif not param.startswith(prefix_):
        param = f"{prefix_}.{param}" if param else prefix_
    return InvalidRequest(err.message, param=param, code=err.code)


def check_job_template(team_id: str, job: dict, allowed=None) -> None:
    """A job template is checked as the job a run will create (all but its training file), and against
    the model list of the key that sets it (issue #29: `allowed`, None for any)."""
    try:
        req = job_rules.CreateJob.model_validate({**job, "training_file": PLACEHOLDER_FILE})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(f"job.{loc}: {first.get('msg')}", param=f"job.{loc}") from None
    try:
        trainable = tuple(m for m in settings().rft_models + settings().nova_models if scopes.model_allowed(allowed, m))
        job_rules.check_create(req, trainable)
        graders.resolve(team_id, req.method.reinforcement.grader, allowed)
        if req.validation_file:
            files.get_file(team_id, req.validation_file, param="validation_file")
    except (InvalidRequest, NotFound) as err:
        raise _under(err, "job") from None


def check(team_id: str, raw: Any, *, current: dict | None = None, allowed=None) -> dict:
    """The whole spec (a PATCH: `current` with the fields sent), checked against the team's data."""
    sent = rules.check_spec(raw, partial=current is not None)
    spec = {**(current or {}), **sent}
    if "dataset" in sent and "file_id" in spec["dataset"]:
        try:
            files.get_file(team_id, spec["dataset"]["file_id"], param="dataset.file_id")
        except NotFound as err:
            raise InvalidRequest(err.message, param="dataset.file_id") from None
    if "job" in sent:
        check_job_template(team_id, spec["job"], allowed)
    if spec["job"].get("suffix") and spec["job"]["suffix"] == spec["target_alias"]:
        # A job's suffix becomes an alias when it succeeds: this one would skip the gate and the approval.
        raise InvalidRequest("job.suffix must differ from target_alias: a succeeded job's suffix alias is given "
                             "before any eval or approval.", param="job.suffix")
    if "eval" in sent:
        try:
            gate = gates.check_gate(team_id, sent["eval"])
        except InvalidRequest as err:
            raise _under(err, "eval", ("gate", "eval")) from None
        if gate["data_source"]["source"]["type"] != "file_id":
            raise InvalidRequest("A pipeline's eval runs on a file: eval.data_source.source must be "
                                 "{\"type\": \"file_id\", \"id\"}.", param="eval.data_source.source")
        spec["eval"] = gate
    return spec


# ---- views ---------------------------------------------------------------------------------------

def view(p: PipelineRecord) -> dict:
    return {"id": p.pipeline_id, "object": "pipeline", "name": p.name, "version": p.version, **p.spec,
            "dataset_prefix": f"s3://{settings().datasets_bucket}/{prefix(p.team_id, p.pipeline_id)}",
            "active_run": p.active_run, "last_run": p.last_run, "created_at": p.created_at,
            "updated_at": p.updated_at}


def get(team_id: str, pipeline_id: str, *, consistent: bool = True) -> PipelineRecord:
    found = dynamo.get_or_none(PipelineRecord, team_id, pipeline_id, what="pipeline", consistent_read=consistent)
    if found is None:
        raise NotFound(f"No pipeline '{files.shown(pipeline_id)}'.", param="pipeline_id")
    return found


def retrieve(team_id: str, pipeline_id: str, version: str | None = None) -> dict:
    p = get(team_id, pipeline_id)
    if version is None:
        return view(p)
    number = _version_number(version)
    stored = dynamo.get_or_none(PipelineVersion, pipeline_id, number, what="pipeline version")
    if stored is None:
        raise NotFound(f"Pipeline '{pipeline_id}' has no version {number}.", param="version")
    return {**view(p), **stored.spec, "version": number}


def _version_number(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 9:
        raise InvalidRequest("version must be a whole number.", param="version")
    return int(raw)


def list_pipelines(team_id: str, limit: int, after: str | None) -> dict:
    start = pagination.resume_at(after, PipelineRecord, hash_value=team_id,
                                 anchor=lambda pid: dynamo.get_or_none(PipelineRecord, team_id, pid, what="pipelines"))
    if start is pagination.NOWHERE:
        return pagination.envelope([])
    page = pagination.query(PipelineRecord, team_id, limit=limit, start=start, newest_first=False, what="pipelines")
    return pagination.envelope([view(p) for p in page.items], page)


def versions(team_id: str, pipeline_id: str) -> dict:
    get(team_id, pipeline_id)
    page = pagination.query(PipelineVersion, pipeline_id, limit=100, newest_first=True, what="pipeline versions")
    return pagination.envelope([{"object": "pipeline.version", "version": int(v.version), "created_at": v.created_at,
                                 "created_by": v.created_by, **v.spec} for v in page.items], page)


def find_by_name(team_id: str, name: str) -> PipelineRecord | None:
    """The team's pipeline of that name (or id), for `/rft pipeline ...`."""
    page = pagination.query(PipelineRecord, team_id, limit=1, newest_first=False,
                            keep=lambda p: p.name == name or p.pipeline_id == name, page_size=100, max_pages=10,
                            what="pipelines")
    return page.items[0] if page.items else None


# ---- changes -------------------------------------------------------------------------------------

def create(team_id: str, raw: Any, created_by: str | None, allowed=None) -> dict:
    spec = check(team_id, raw, allowed=allowed)
    pipeline_id = ids.new_id("pipe")
    now = ids.now()
    record = PipelineRecord(team_id, pipeline_id, name=spec["name"], version=1, spec=spec, created_at=now,
                            updated_at=now, created_by=created_by)
    # The schedule first: a schedule without its pipeline triggers nothing (the trigger finds no
    # pipeline); a pipeline without its schedule would never run on time.
    sync_schedule(team_id, pipeline_id, spec["triggers"].get("schedule"))
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.save(record, condition=PipelineRecord.pipeline_id.does_not_exist())
            tx.save(PipelineVersion(pipeline_id, 1, team_id=team_id, spec=spec, created_at=now, created_by=created_by),
                    condition=PipelineVersion.version.does_not_exist())
    except TransactWriteError as err:
        _drop_schedule(pipeline_id)
        if dynamo.is_busy(err):
            raise dynamo.busy_error("pipeline") from None
        raise
    return view(record)


def update(team_id: str, pipeline_id: str, raw: Any, changed_by: str | None, allowed=None) -> dict:
    current = get(team_id, pipeline_id)
    if isinstance(raw, dict) and "name" in raw and raw["name"] != current.name:
        raise InvalidRequest("A pipeline's name cannot change; create a new pipeline.", param="name")
    spec = check(team_id, raw, current=current.spec, allowed=allowed)
    if spec == current.spec:
        return view(current)
    version, now = int(current.version) + 1, ids.now()
    sync_schedule(team_id, pipeline_id, spec["triggers"].get("schedule"))
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.update(current, actions=[PipelineRecord.spec.set(spec), PipelineRecord.version.set(version),
                                        PipelineRecord.updated_at.set(now)],
                      condition=PipelineRecord.version == current.version)
            tx.save(PipelineVersion(pipeline_id, version, team_id=team_id, spec=spec, created_at=now,
                                    created_by=changed_by), condition=PipelineVersion.version.does_not_exist())
    except TransactWriteError as err:
        sync_schedule(team_id, pipeline_id, current.spec["triggers"].get("schedule"))   # as it was
        if dynamo.is_busy(err):
            raise dynamo.busy_error("pipeline") from None
        raise Conflict(f"Pipeline '{pipeline_id}' changed concurrently; retry.", param="pipeline_id") from None
    return view(get(team_id, pipeline_id))


def delete(team_id: str, pipeline_id: str) -> dict:
    current = get(team_id, pipeline_id)
    if current.active_run:
        raise Conflict(f"Pipeline '{pipeline_id}' has a run in progress ({current.active_run}); delete it when the "
                       "run has ended.", param="pipeline_id", code="pipeline_busy")
    try:
        dynamo.call(lambda: current.delete(condition=PipelineRecord.active_run.does_not_exist()), idempotent=True,
                    what="pipeline delete")
    except DeleteError as err:
        if dynamo.is_condition(err):
            raise Conflict(f"Pipeline '{pipeline_id}' started a run meanwhile; retry when it has ended.",
                           param="pipeline_id", code="pipeline_busy") from None
        raise
    _drop_schedule(pipeline_id)
    return {"id": pipeline_id, "object": "pipeline.deleted", "deleted": True}


def upload_url(team_id: str, pipeline_id: str, filename: str | None) -> dict:
    """A presigned PUT for one new JSONL under the pipeline's prefix (valid 15 minutes)."""
    p = get(team_id, pipeline_id)
    if not p.spec["dataset"].get("prefix"):
        raise InvalidRequest("This pipeline reads a fixed file (dataset.file_id); uploads go to pipelines whose "
                             "dataset is {\"prefix\": true}.", param="dataset")
    stem = filename or "data.jsonl"
    if not isinstance(stem, str) or not stem.endswith(".jsonl") or len(stem) > 100 or "/" in stem:
        raise InvalidRequest("filename must be a name ending in .jsonl (at most 100 characters).", param="filename")
    key = f"{prefix(team_id, pipeline_id)}{ids.now_ms():013d}-{secrets.token_hex(4)}-{stem}"
    url = aws.s3().generate_presigned_url("put_object", Params={"Bucket": settings().datasets_bucket, "Key": key},
                                          ExpiresIn=UPLOAD_URL_SECONDS)
    return {"object": "pipeline.upload", "method": "PUT", "url": url, "key": key,
            "expires_at": ids.now() + UPLOAD_URL_SECONDS}


# ---- schedules (EventBridge Scheduler) -----------------------------------------------------------

def _not_found(err: ClientError) -> bool:
    return err.response.get("Error", {}).get("Code") == "ResourceNotFoundException"


def _schedule_name(pipeline_id: str) -> str:
    return pipeline_id[:64]


def _queue_arn() -> str:
    attrs = aws.sqs().get_queue_attributes(QueueUrl=queues.url(pipeline_triggers_queue()), AttributeNames=["QueueArn"])
    return attrs["Attributes"]["QueueArn"]


def sync_schedule(team_id: str, pipeline_id: str, expression: str | None) -> None:
    """The pipeline's schedule as its spec says: made, changed or removed (idempotent)."""
    if expression is None:
        _drop_schedule(pipeline_id)
        return
    client = aws.scheduler()
    target = {"Arn": _queue_arn(), "RoleArn": pipeline_scheduler_role_arn(),
              "Input": json.dumps({"trigger": "schedule", "team_id": team_id, "pipeline_id": pipeline_id,
                                  "scheduled_time": "<aws.scheduler.scheduled-time>"}),
              "RetryPolicy": {"MaximumEventAgeInSeconds": 3600, "MaximumRetryAttempts": 10}}
    args = {"Name": _schedule_name(pipeline_id), "GroupName": pipeline_schedule_group(),
            "ScheduleExpression": expression, "ScheduleExpressionTimezone": "UTC",
            "FlexibleTimeWindow": {"Mode": "OFF"}, "Target": target, "State": "ENABLED"}
    try:
        client.update_schedule(**args)
    except ClientError as err:
        if not _not_found(err):
            raise
        client.create_schedule(**args)


def _drop_schedule(pipeline_id: str) -> None:
    try:
        aws.scheduler().delete_schedule(Name=_schedule_name(pipeline_id), GroupName=pipeline_schedule_group())
    except ClientError as err:
        if not _not_found(err):
            raise
    except ApiError as err:
        logger.warning("schedule not removed", extra={"pipeline_id": pipeline_id, "error": err.message})
