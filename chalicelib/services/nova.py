"""Amazon Nova through Bedrock's native API: the family-specific half of a job, its custom
model's deployment, and inference through Converse.

* Jobs (services/jobs.py picks this module for a Nova model through `upstream`): `create_job`
  writes the training rows to S3 and calls CreateModelCustomizationJob; `retrieve_job`,
  `cancel_job`, `list_events` and `list_checkpoints` answer as the Mantle adapter does (OpenAI
  shapes), so `apply_remote`, `sync_events` and the reconciler are the same for both families.
  Events are the training metrics Bedrock writes to the output prefix (`metrics` events: the
  reward curve); checkpoints: Bedrock's native API exposes none for RFT (only the final model).
* Deployments: a succeeded job's custom model gets an on-demand deployment
  (CreateCustomModelDeployment), callable once Active -- watched by the reconciler, announced on
  rft-hub's bus (`rft-hub.model.deployment_changed`). Pointing an alias at a Nova model deploys it
  if it has no deployment; moving the last alias away, or retiring the model, deletes it.
* Inference: `converse_call` turns a gateway call on a Nova model (base, tuned, alias) into
  Converse/ConverseStream (domain/converse.py), inside the gateway's one metering path.
"""
from __future__ import annotations

import json
import tempfile
import time
import uuid

from pynamodb.exceptions import PutError, UpdateError

from chalicelib.adapters import aws
from chalicelib.adapters import bedrock_native as native
from chalicelib.adapters.bedrock import BedrockRejected
from chalicelib.config import settings
from chalicelib.domain import converse as translate
from chalicelib.domain import ids
from chalicelib.domain import nova as rules
from chalicelib.domain.datasets import iter_lines
from chalicelib.errors import ApiError, NotFound, UpstreamError
from chalicelib.log import logger
from chalicelib.services.cache import TTLCache
from chalicelib.store import dynamo
from chalicelib.store.models import Alias, Job, NovaModel, OutboxEvent

PENDING = "pending"
DEPLOYMENT_EVENT = "rft-hub.model.deployment_changed"
METRICS_CACHE_SECONDS = 5.0


def handles(model: str | None) -> bool:
    """True for a model trained and served through Bedrock's native API."""
    return rules.is_nova(model)


# ---- submission -------------------------------------------------------------------------------

def data_prefix(team_id: str, job_id: str) -> str:
    """The job's prefix in the datasets bucket: training data in, Bedrock's output under output/."""
    return f"nova/{team_id}/{job_id}/"


def _write_rows(job: Job, file_id: str, name: str) -> str:
    """The dataset as Bedrock reads it, in S3; every row carries rft-hub's grader fields (as the
    Mantle upload does: services/jobs.py `_bedrock_file_id`). Returns its s3:// URI."""
    from chalicelib.services import files, graders, hosted_grader

    record = files.get_file(job.team_id, file_id)
    bucket, key = settings().datasets_bucket, data_prefix(job.team_id, job.job_id) + name
    with tempfile.TemporaryFile() as tmp:      # Lambda's /tmp holds files far larger than its memory
        for number, line in enumerate(iter_lines(files.open_content(record)), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if job.grader_ref:
                row[graders.REF_FIELD] = job.grader_ref
                row[hosted_grader.JOB_FIELD] = f"{job.team_id}/{job.job_id}"
                own = row.get("id")
                row[hosted_grader.PROMPT_FIELD] = own if isinstance(own, str) and own else f"line-{number}"
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


# ---- custom models and their deployments ---------------------------------------------------------

def _model(team_id: str, model_id: str) -> NovaModel | None:
    return dynamo.get_or_none(NovaModel, team_id, model_id, consistent_read=True, what="nova model")


def on_succeeded(job: Job) -> None:
    """A succeeded Nova job: its custom model recorded, then deployed. Idempotent (the job's
    finalize repeats it until it completes)."""
    if not job.fine_tuned_model or _model(job.team_id, job.fine_tuned_model) is not None:
        if job.fine_tuned_model:
            ensure_deployment(job.team_id, job.fine_tuned_model)
        return
    found = native.get_job(job.bedrock_job_id)
    arn = found.get("outputModelArn")
    if not arn:
        raise UpstreamError(f"Amazon Bedrock reports no output model for {job.bedrock_job_id} yet.")
    now = ids.now()
    record = NovaModel(job.team_id, job.fine_tuned_model, team_model=f"{job.team_id}#{job.fine_tuned_model}",
                       job_id=job.job_id, base_model=job.model, custom_model_arn=arn, deployment_status="requested",
                       pending_shard=PENDING, created_at=now, updated_at=now)
    try:
        record.save(condition=NovaModel.model_id.does_not_exist())
    except PutError as exc:
        if not dynamo.is_condition(exc):
            raise
    ensure_deployment(job.team_id, job.fine_tuned_model)


def ensure_deployment(team_id: str, model_id: str) -> NovaModel | None:
    """Gives a Nova model a deployment unless it has one (Creating or Active). Never raises for
    Bedrock: a failed create leaves the model `requested` for the reconciler."""
    record = _model(team_id, model_id)
    if record is None or record.deployment_status in ("Creating", "Active"):
        return record
    generation = int(record.generation or 0) + 1
    name = rules.deployment_name(record.custom_model_arn, generation)
    token = rules.request_token(team_id, model_id, str(generation))
    try:
        arn = native.create_deployment(name, record.custom_model_arn, token,
                                       description=f"rft-hub {team_id} {model_id}"[:2048])
    except ApiError as err:
        logger.warning("deployment not created; the reconciler retries", extra={"model": model_id,
                                                                               "error": err.message})
        record.update(actions=[NovaModel.deployment_status.set("requested"), NovaModel.pending_shard.set(PENDING),
                               NovaModel.failure_message.set(err.message[:1000]),
                               NovaModel.updated_at.set(ids.now())])
        return record
    try:
        record.update(actions=[NovaModel.deployment_status.set("Creating"), NovaModel.deployment_arn.set(arn),
                               NovaModel.deployment_name.set(name), NovaModel.generation.set(generation),
                               NovaModel.pending_shard.set(PENDING), NovaModel.failure_message.remove(),
                               NovaModel.updated_at.set(ids.now())],
                      condition=NovaModel.generation == record.generation)
    except UpdateError as exc:
        if not dynamo.is_condition(exc):
            raise
        record.refresh(consistent_read=True)       # a concurrent caller recorded the same (same token)
    _deployments.invalidate((team_id, model_id))
    return record


def _pointed_at(team_id: str, model_id: str) -> list[str]:
    return [a.alias for a in Alias.query(team_id) if a.model_id == model_id]


def release_deployment(team_id: str, model_id: str, *, reason: str) -> bool:
    """Deletes a Nova model's deployment when no alias points at it. True if it was deleted."""
    record = _model(team_id, model_id)
    if record is None or not record.deployment_arn or record.deployment_status in ("Deleted", None):
        return False
    if _pointed_at(team_id, model_id):
        return False
    arn = record.deployment_arn
    try:
        record.update(actions=[NovaModel.deployment_status.set("Deleting"), NovaModel.pending_shard.set(PENDING),
                               NovaModel.updated_at.set(ids.now())],
                      condition=NovaModel.deployment_arn == arn)
    except UpdateError as exc:
        if dynamo.is_condition(exc):
            return False
        raise
    _deployments.invalidate((team_id, model_id))
    return _delete(record, reason)


def _delete(record: NovaModel, reason: str) -> bool:
    arn = record.deployment_arn
    try:
        native.delete_deployment(arn)
    except NotFound:
        pass          # gone already
    except ApiError as err:
        logger.warning("deployment not deleted; the reconciler retries", extra={"model": record.model_id,
                                                                               "error": err.message})
        return False
    try:
        record.update(actions=[NovaModel.deployment_status.set("Deleted"), NovaModel.pending_shard.remove(),
                               NovaModel.failure_message.set(reason[:1000]), NovaModel.updated_at.set(ids.now())],
                      condition=(NovaModel.deployment_arn == arn) & (NovaModel.deployment_status == "Deleting"))
    except UpdateError as exc:
        if not dynamo.is_condition(exc):
            raise
        return False
    _announce(record, "Deleted", arn)
    return True


def on_alias_moved(team_id: str, model_id: str, previous: str | None) -> None:
    """An alias now points at `model_id` (deployed if it has no deployment); `previous` lost
    it (its deployment deleted if no alias points at it any more). Never fails the alias move:
    what Bedrock refuses now, the reconciler finishes."""
    try:
        if _model(team_id, model_id) is not None:
            ensure_deployment(team_id, model_id)
        if previous and previous != model_id:
            release_deployment(team_id, previous, reason="No alias points at the model any more.")
    except ApiError as err:
        logger.warning("deployment change deferred", extra={"model": model_id, "error": err.message})


def _announce(record: NovaModel, status: str, arn: str | None) -> None:
    """One bus event per deployment and status (`rft-hub.model.deployment_changed`)."""
    from chalicelib.services import outbox

    key = f"{arn}#{status}"
    if record.announced == key:
        return
    event = outbox.stage(DEPLOYMENT_EVENT, record.team_id, event_id=ids.stable_id("evt", key),
                         model=record.model_id, base_model=record.base_model, job_id=record.job_id,
                         status=status, deployment_arn=arn, custom_model_arn=record.custom_model_arn,
                         failure_message=record.failure_message if status == "Failed" else None)
    try:
        event.save(condition=OutboxEvent.event_id.does_not_exist())
    except PutError as exc:
        if not dynamo.is_condition(exc):
            raise
    record.update(actions=[NovaModel.announced.set(key)])
    outbox.publish([event])


def reconcile() -> dict:
    """The reconciler's pass over pending deployments (a query on the sparse `pending` index):
    Creating -> Active | Failed from Bedrock, `requested` created, `Deleting` deleted."""
    counts = {"checked": 0, "active": 0, "failed": 0, "created": 0, "deleted": 0, "errors": 0}
    for key in NovaModel.pending.query(PENDING):
        team_id, _, model_id = key.team_model.partition("#")
        counts["checked"] += 1
        try:
            record = _model(team_id, model_id)
            if record is None:
                continue
            if record.deployment_status == "requested":
                counts["created"] += int(ensure_deployment(team_id, model_id).deployment_status == "Creating")
            elif record.deployment_status == "Deleting":
                counts["deleted"] += int(_delete(record, "No alias points at the model any more."))
            elif record.deployment_status == "Creating":
                outcome = _watch(record)
                if outcome:
                    counts[outcome] += 1
        except Exception as exc:  # noqa: BLE001 - one model must not stop the pass
            counts["errors"] += 1
            logger.warning("deployment reconcile failed", extra={"model": model_id, "error": type(exc).__name__})
    return counts


def _watch(record: NovaModel) -> str | None:
    """Polls a Creating deployment; records and announces Active or Failed. Returns which."""
    try:
        found = native.get_deployment(record.deployment_arn)
    except NotFound:      # gone (deleted outside rft-hub): as good as failed; an alias move redeploys it
        found = {"status": "Failed", "failureMessage": "Amazon Bedrock no longer knows this deployment."}
    status = found.get("status")
    if status not in ("Active", "Failed"):
        return None
    actions = [NovaModel.deployment_status.set(status), NovaModel.pending_shard.remove(),
               NovaModel.updated_at.set(ids.now())]
    if status == "Failed":
        actions.append(NovaModel.failure_message.set(str(found.get("failureMessage") or "Deployment failed.")[:1000]))
    try:
        record.update(actions=actions, condition=(NovaModel.deployment_status == "Creating") &
                      (NovaModel.deployment_arn == record.deployment_arn))
    except UpdateError as exc:
        if dynamo.is_condition(exc):
            return None
        raise
    _deployments.invalidate((record.team_id, record.model_id))
    _announce(record, status, record.deployment_arn)
    return "active" if status == "Active" else "failed"


def deployment_view(team_id: str, model_id: str) -> dict | None:
    record = _model(team_id, model_id)
    if record is None:
        return None
    return {"model": model_id, "custom_model_arn": record.custom_model_arn, "status": record.deployment_status,
            "deployment_arn": record.deployment_arn, "failure_message": record.failure_message}


# ---- inference: Converse -------------------------------------------------------------------------

# A deployment's ARN per (team, model), read on every call: cached per warm instance once Active.
_deployments = TTLCache(30)


def _serving_arn(team_id: str, model_id: str) -> str:
    def load():
        record = _model(team_id, model_id)
        return (record.deployment_status, record.deployment_arn) if record else (None, None)

    status, arn = _deployments.get((team_id, model_id), load)
    if status != "Active":
        _deployments.invalidate((team_id, model_id))      # only a serving deployment stays cached
    if status == "Active" and arn:
        return arn
    if status is None:
        raise NotFound(f"The model '{model_id}' has no Amazon Bedrock deployment record.", param="model",
                       code="model_not_found")
    if status == "Deleted":
        raise native.ModelNotReady(f"Model '{model_id}' is not deployed: its deployment was deleted when no alias "
                                   "pointed at it. Point an alias at it to deploy it again.", param="model",
                                   code="model_not_deployed")
    if status == "Failed":
        raise native.ModelNotReady(f"Model '{model_id}' could not be deployed on Amazon Bedrock; point an alias at "
                                   "it to try again.", param="model", code="model_not_deployed")
    raise native.ModelNotReady(f"Model '{model_id}' is being deployed on Amazon Bedrock (status {status}); it is "
                               "callable once the deployment is Active, usually within minutes.", param="model")


class ConverseCall:
    """One gateway call translated to Converse: `call` answers whole, `open_stream` opens
    ConverseStream and returns an upstream whose lines are OpenAI's server-sent events."""

    def __init__(self, endpoint: str, body: dict, model_id: str, request: dict) -> None:
        self.endpoint, self.body, self.model_id, self.request = endpoint, body, model_id, request
        self.chat = endpoint == "/chat/completions"
        self.answer_model = body.get("model") or model_id
        self.id = ("chatcmpl-" if self.chat else "resp_") + uuid.uuid4().hex[:24]

    def call(self, deadline_s: float) -> tuple[int, str, bytes]:
        answer = native.converse(self.model_id, self.request, deadline_s)
        if self.chat:
            out = translate.chat_completion(answer, model=self.answer_model, id_=self.id, created=ids.now())
        else:
            out = translate.response_object(answer, body=self.body, model=self.answer_model, id_=self.id,
                                            created=ids.now())
        return 200, "application/json", json.dumps(out, separators=(",", ":")).encode()

    def open_stream(self, deadline_s: float) -> "ConverseUpstream":
        events = native.converse_stream(self.model_id, self.request, deadline_s)
        if self.chat:
            translator = translate.ChatStream(model=self.answer_model, id_=self.id, created=ids.now())
        else:
            translator = translate.ResponsesStream(body=self.body, model=self.answer_model, id_=self.id,
                                                   created=ids.now())
        return ConverseUpstream(events, translator, self.chat)


class ConverseUpstream:
    """ConverseStream's events as the lines of OpenAI's event stream (what the gateway's Stream
    reads from an upstream response: `iter_lines()`, `close()`)."""

    def __init__(self, events, translator, chat: bool) -> None:
        self._events, self._translator, self._chat = events, translator, chat

    def iter_lines(self):
        for event in self._events:
            for out in self._translator.feed(event):
                if not self._chat:
                    yield f"event: {out['type']}"
                yield "data: " + json.dumps(out, separators=(",", ":"))
                yield ""
        if self._chat:
            yield "data: [DONE]"
            yield ""

    def close(self) -> None:
        try:
            self._events.close()
        except Exception:  # noqa: BLE001 - closing a finished or broken stream
            pass


def check_translatable(target, endpoint: str, body: dict) -> None:
    """Refuses (400 naming the parameter) what Converse could not take for a model it serves,
    before any call: e.g. a grader's judge, checked when the grader is."""
    if handles(target.base_model):
        translate.chat_request(body) if endpoint == "/chat/completions" else translate.responses_request(body)


def converse_call(team_id: str, target, endpoint: str, body: dict) -> ConverseCall | None:
    """The Converse translation of a gateway call when its model is served by Converse (a base
    Nova model, a Nova custom model's Active deployment); None otherwise. Refuses before
    anything is held: a parameter Converse cannot take (400 naming it), a model not deployed."""
    if not handles(target.base_model):
        return None
    request = translate.chat_request(body) if endpoint == "/chat/completions" else translate.responses_request(body)
    if target.upstream == target.base_model:
        model_id = target.upstream             # a base model, by its own id
    else:
        model_id = _serving_arn(team_id, target.upstream)
    return ConverseCall(endpoint, body, model_id, request)
