"""The tuned-model catalog: models registered from finished jobs, their aliases as read, the
training watch's verdict kept on each model, resolution of a `model` string, retiring. Moving an
alias is evaluation/promotion.py (gates decide it)."""
from __future__ import annotations

import re
from collections.abc import Callable

from pynamodb.exceptions import DoesNotExist, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib import outbox
from chalicelib.cache import TTLCache
from chalicelib.domain import ids, numbers
from chalicelib.domain.nova import is_nova
from chalicelib.errors import Conflict, NotFound
from chalicelib.inference import deployments
from chalicelib.log import logger
from chalicelib.platform import audit
from chalicelib.store import dynamo
from chalicelib.store.models import Alias, AliasChange, Checkpoint, Job, TunedModel, connection

ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
# Resolutions are read on every gateway call: cached per warm instance. An alias re-pointed
# through this instance applies at once; through another, within 30 s.
_resolved = TTLCache(30)


def tuned_view(m: TunedModel) -> dict:
    return {"id": m.model_id, "object": "model", "created": m.created_at, "owned_by": m.team_id,
            "rft_kind": "tuned", "rft_base_model": m.base_model, "rft_job_id": m.job_id,
            "rft_final_reward": m.final_reward, "rft_best_reward": m.best_reward,
            "rft_checkpoints": m.checkpoints, "rft_grader": m.grader, "rft_watch": m.watch}


def alias_view(a: Alias) -> dict:
    return {"id": a.alias, "object": "model", "created": a.updated_at, "owned_by": a.team_id,
            "rft_kind": "alias", "rft_target": a.model_id, "rft_base_model": a.base_model, "rft_version": a.version}


def _version_view(team_id: str, name: str, c: AliasChange) -> dict:
    return {"id": name, "object": "model", "created": c.changed_at, "owned_by": team_id, "rft_kind": "alias",
            "rft_target": c.model_id, "rft_base_model": c.base_model, "rft_version": c.version}


def _checkpoint_view(team_id: str, name: str, m: TunedModel, entry: dict) -> dict:
    created = m.created_at
    try:   # the checkpoint's own time (its key is "<step:08d>#<id>"); the model's if it is gone
        created = Checkpoint.get(m.job_id, f"{int(entry.get('step') or 0):08d}#{entry.get('id')}").created_at
    except (DoesNotExist, TypeError, ValueError):
        pass
    return {"id": name, "object": "model", "created": created, "owned_by": team_id, "rft_kind": "checkpoint",
            "rft_target": name, "rft_base_model": m.base_model, "rft_job_id": m.job_id, "rft_step": entry.get("step")}


def describe(team_id: str, name: str) -> dict | None:
    """The Model object GET /v1/models/{id} answers for a team's alias (`alias@version` too), tuned
    model or checkpoint: for an alias or tuned model the very object the list shows (its real
    `created`), None if the name is none of these."""
    target = resolve(team_id, name)
    if target is None:
        return None
    try:
        if target["kind"] == "alias":
            alias, _, version = name.partition("@")
            if not version:
                return alias_view(Alias.get(team_id, alias))
            return _version_view(team_id, name, AliasChange.get(f"{team_id}#{alias}", target["version"]))
        if target["kind"] == "tuned":
            return tuned_view(TunedModel.get(team_id, name))
    except DoesNotExist:   # removed since it was resolved
        return None
    for m in TunedModel.query(team_id):
        for entry in m.checkpoints or []:
            if entry.get("model") == name:
                return _checkpoint_view(team_id, name, m, entry)
    return None


def change_view(c: AliasChange) -> dict:
    return {"alias": c.team_alias.split("#", 1)[1], "version": c.version, "model": c.model_id,
            "previous_model": c.previous_model_id, "changed_by": c.changed_by, "changed_at": c.changed_at}


# ---- the training watch's verdict on a model (issue #24) --------------------------------------------
#
# A job whose watch raised a critical finding never publishes silently: with `on_critical: cancel`
# its model (if Bedrock finished first) is registered *quarantined* -- not callable, listed or
# aliased -- until the admin releases it with a reason; with `alert` it is *flagged* -- callable,
# but every alias move to it needs the admin's override, which the alias history records. The
# verdict is training's (training/watch.py); the catalog keeps it and honours it.

QUARANTINED, FLAGGED, RELEASED = "quarantined", "flagged", "released"


def quarantined(m: TunedModel | None) -> bool:
    return m is not None and (m.watch or {}).get("state") == QUARANTINED


def set_verdict(team_id: str, model_id: str, verdict: dict) -> None:
    """A verdict reached after the model was registered (a finding recorded late): the model takes
    it now, never weakening one (a released model stays released, a quarantine stays)."""
    model = dynamo.get_or_none(TunedModel, team_id, model_id, what="tuned model")
    state = (model.watch or {}).get("state") if model is not None else None
    if model is None or state in (QUARANTINED, RELEASED) or (state == FLAGGED and verdict["state"] == FLAGGED):
        return
    try:
        model.update(actions=[TunedModel.watch.set(verdict)], condition=TunedModel.watch.does_not_exist()
                     | (TunedModel.watch == model.watch))
    except UpdateError as err:
        if dynamo.is_busy(err):
            raise dynamo.busy_error("tuned model") from None
        return      # changed concurrently (released or quarantined by another caller)
    _resolved.invalidate()


def release_model(team_id: str, model_id: str, reason: str, released_by: str) -> tuple[TunedModel, str | None]:
    """The watch's verdict lifted with a reason: the model callable again, the release recorded on
    it and on the bus (`rft-hub.model.released`). Returns the model and the state it was released
    from (None when it was already released: idempotent)."""
    try:
        model = TunedModel.get(team_id, model_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound(f"No tuned model '{model_id}' in this team.", param="model", code="model_not_found") from None
    state = (model.watch or {}).get("state")
    if state == RELEASED:
        return model, None
    if state not in (QUARANTINED, FLAGGED):
        raise Conflict(f"Model '{model_id}' has no training watch verdict to release.", param="model",
                       code="model_not_quarantined")
    released = {**model.watch, "state": RELEASED, "released_from": state, "released_by": released_by,
                "reason": reason, "released_at": ids.now()}
    event = outbox.stage("rft-hub.model.released", team_id, model=model_id, job_id=model.job_id,
                         released_from=state, released_by=released_by, reason=reason,
                         findings=[f.get("code") for f in model.watch.get("findings") or []])
    act = audit.Act("model.released", f"model:{model_id}", team_id, before={"watch": state},
                    after={"watch": RELEASED, "reason": reason, "released_by": released_by})
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.update(model, actions=[TunedModel.watch.set(released)], condition=TunedModel.watch == model.watch)
            tx.save(event)
            audited = audit.transact_put(tx, act)    # the audit log's entry, in the same transaction
    except TransactWriteError as err:
        if dynamo.is_busy(err):
            raise dynamo.busy_error("tuned model") from None
        raise Conflict(f"Model '{model_id}' changed concurrently; retry.", param="model") from None
    outbox.publish([event, audited])
    _resolved.invalidate()
    model.watch = released
    return model, state


# ---- registration (from a finished job) -------------------------------------------------------

def register(job: Job, details: Callable[[], tuple[float | None, float | None, dict | None]]) -> TunedModel | None:
    """Idempotent: registers the job's model once, with its rewards and the training watch's verdict
    (training hands in `details`, () -> (final, best, verdict), read only when the model is new: a
    repeated finalize costs one read). The job's suffix alias is training's event's business
    (evaluation/promotion.give_suffix_alias), never given here."""
    if not job.fine_tuned_model:
        logger.warning("finished job without a model", extra={"job_id": job.job_id})
        return None
    existing = dynamo.get_or_none(TunedModel, job.team_id, job.fine_tuned_model, what="tuned model",
                                  consistent_read=True)
    if existing is not None:
        return existing
    final, best, verdict = details()
    checkpoints = [{"id": c.checkpoint_id, "model": c.fine_tuned_model_checkpoint, "step": c.step_number}
                   for c in Checkpoint.query(job.job_id)]
    model = TunedModel(job.team_id, job.fine_tuned_model, base_model=job.model, job_id=job.job_id,
                       grader=job.method.get("reinforcement", {}).get("grader", {}), final_reward=final,
                       best_reward=best, checkpoints=checkpoints, created_at=ids.now(), watch=verdict)
    event = outbox.stage("rft-hub.model.registered", job.team_id, model=model.model_id, base_model=job.model,
                         job_id=job.job_id, final_reward=final, best_reward=best,
                         watch=verdict["state"] if verdict else None)
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.save(model, condition=TunedModel.model_id.does_not_exist())
            tx.save(event)
    except TransactWriteError as err:
        if dynamo.is_busy(err):      # a throttle or conflict: finalize is repeated, never skipped
            raise dynamo.busy_error("tuned model") from None
        return TunedModel.get(job.team_id, job.fine_tuned_model, consistent_read=True)
    outbox.publish([event])
    _resolved.invalidate()
    if verdict is not None:
        logger.warning("model registered under the training watch's verdict",
                       extra={"job_id": job.job_id, "model": model.model_id, "state": verdict["state"]})
    return model


def forget(team_id: str, name: str) -> None:
    """This instance's cached resolution of `name` dropped (an alias just moved through it)."""
    _resolved.invalidate((team_id, name))


# ---- aliases ----------------------------------------------------------------------------------

def owned_target(team_id: str, model_id: str) -> TunedModel:
    """The team's tuned model that is (or holds the checkpoint) `model_id`; 404 otherwise."""
    try:
        return TunedModel.get(team_id, model_id, consistent_read=True)
    except DoesNotExist:
        pass
    for m in TunedModel.query(team_id):
        if any(c.get("model") == model_id for c in m.checkpoints or []):
            return m
    raise NotFound(f"No tuned model or checkpoint '{model_id}' in this team.", param="model")


def watch_check(model: TunedModel, model_id: str, override_reason: str | None) -> dict | None:
    """The training watch's say on an alias move to `model` (issue #24): a quarantined model is
    never aliased (release it first); a flagged one needs the admin's override with a reason.
    Returns the evidence the move records, or None."""
    watch = model.watch or {}
    codes = ", ".join(sorted({f.get("code", "?") for f in watch.get("findings") or []})) or "a stop"
    if watch.get("state") == QUARANTINED:
        raise Conflict(f"Model '{model_id}' is quarantined by the training watch ({codes}); the admin must release "
                       f"it (POST /v1/admin/teams/{{team}}/model_releases) before an alias can point at it.",
                       param="model", code="model_quarantined")
    if watch.get("state") == FLAGGED and not override_reason:
        raise Conflict(f"Model '{model_id}' was flagged by the training watch ({codes}); moving an alias to it needs "
                       "the admin's override_reason.", param="model", code="watch_finding")
    if watch and override_reason:
        return {"override_reason": override_reason, "watch": {k: watch.get(k) for k in ("state", "findings")}}
    return None


def list_aliases(team_id: str) -> list[dict]:
    return [alias_view(a) for a in Alias.query(team_id)]


def list_tuned(team_id: str) -> list[dict]:
    return [tuned_view(m) for m in TunedModel.query(team_id) if not quarantined(m)]


def resolve_cached(team_id: str, name: str) -> dict | None:
    return _resolved.get((team_id, name), lambda: dynamo.call(lambda: resolve(team_id, name), idempotent=True,
                                                              what="model resolution"))


def resolve(team_id: str, name: str) -> dict | None:
    """What a `model` string means for a team: an alias (optionally `alias@version`), a tuned
    model or one of its checkpoints. None if it is none of these."""
    alias, _, version = name.partition("@")
    if ALIAS_RE.match(alias):
        try:
            current = Alias.get(team_id, alias)
        except DoesNotExist:
            current = None
        if current and not version:
            # An alias never serves a model quarantined after it moved (a finding recorded late).
            if quarantined(dynamo.get_or_none(TunedModel, team_id, current.model_id, what="alias target")):
                return None
            return {"kind": "alias", "alias": alias, "model": current.model_id, "base_model": current.base_model,
                    "version": current.version}
        number = numbers.ascii_int(version)    # ASCII digits only: '²'.isdigit() is true, int('²') raises
        if current and number is not None:
            try:
                change = AliasChange.get(f"{team_id}#{alias}", number)
            except DoesNotExist:
                return None
            return {"kind": "alias", "alias": alias, "model": change.model_id, "base_model": change.base_model,
                    "version": change.version}
    try:
        tuned = TunedModel.get(team_id, name)
        if quarantined(tuned):
            return None     # never served until the admin releases it (issue #24)
        return {"kind": "tuned", "alias": None, "model": tuned.model_id, "base_model": tuned.base_model}
    except DoesNotExist:
        pass
    for m in TunedModel.query(team_id):
        if any(c.get("model") == name for c in m.checkpoints or []):
            return None if quarantined(m) else {"kind": "checkpoint", "alias": None, "model": name,
                                                "base_model": m.base_model}
    return None


# ---- Amazon Nova deployments and retiring a model (issue #15) -------------------------------------

def deployments_follow(team_id: str, record: Alias, previous: Alias | None) -> None:
    """The alias's new model is deployed if it has no deployment; the model it left loses its
    deployment if no alias points at it any more. Only Nova models have deployments."""

    if is_nova(record.base_model) or (previous is not None and is_nova(previous.base_model)):
        deployments.on_alias_moved(team_id, record.model_id, previous.model_id if previous else None)


def retire(team_id: str, model_id: str) -> dict:
    """Retires a team's tuned model: no longer listed or callable by its id (its alias history
    keeps it). Refused (409 `model_in_use`) while an alias points at it; an Amazon Nova model's
    deployment is deleted. The answer is OpenAI's model deletion object."""

    try:
        model = TunedModel.get(team_id, model_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound(f"No tuned model '{model_id}' in this team.", param="model", code="model_not_found") from None
    pointing = sorted(a.alias for a in Alias.query(team_id) if a.model_id == model_id)
    if pointing:
        raise Conflict(f"Alias(es) {', '.join(pointing)} point at '{model_id}'; point them elsewhere first.",
                       param="model", code="model_in_use")
    if is_nova(model.base_model):
        deployments.release_deployment(team_id, model_id, reason="The model was retired.")
    model.delete()
    _resolved.invalidate((team_id, model_id))
    return {"id": model_id, "object": "model", "deleted": True}
