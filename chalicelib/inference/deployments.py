"""Amazon Nova's custom models and their on-demand deployments (Bedrock's native API).

A succeeded job's custom model gets an on-demand deployment (CreateCustomModelDeployment),
callable once Active -- watched by the reconciler, announced on rft-hub's bus
(`rft-hub.model.deployment_changed`). Pointing an alias at a Nova model deploys it if it has no
deployment; moving the last alias away, or retiring the model, deletes it.
"""
from __future__ import annotations

from pynamodb.exceptions import PutError, UpdateError

from chalicelib import outbox
from chalicelib.adapters import bedrock_native as native
from chalicelib.cache import TTLCache
from chalicelib.domain import ids
from chalicelib.domain import nova as rules
from chalicelib.errors import ApiError, NotFound, UpstreamError
from chalicelib.log import logger
from chalicelib.store import dynamo
from chalicelib.store.models import Alias, Job, NovaModel, OutboxEvent

PENDING = "pending"
DEPLOYMENT_EVENT = "rft-hub.model.deployment_changed"
METRICS_CACHE_SECONDS = 5.0


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


# A deployment's ARN per (team, model), read on every call: cached per warm instance once Active.
_deployments = TTLCache(30)


def serving_arn(team_id: str, model_id: str) -> str:
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
