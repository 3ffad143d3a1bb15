"""The tuned-model registry and aliases (promote, roll back, audit trail)."""
from __future__ import annotations

import re

from pynamodb.exceptions import DoesNotExist, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import ids, numbers
from chalicelib.errors import Conflict, InvalidRequest, NotFound
from chalicelib.log import logger
from chalicelib.services import outbox
from chalicelib.services.cache import TTLCache
from chalicelib.store.models import (Alias, AliasChange, AliasGate, Checkpoint, Job, JobEvent, TunedModel,
                                     WatchFinding, connection)
from chalicelib.store import dynamo
from chalicelib.store import pagination

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


# ---- registration (from a succeeded job) ------------------------------------------------------

# The reward curve is read with bounded work, however long the job's history (issue #12):
# * best: the job's reward summary item in the job_events table (hash "<job id>#rewards", range
#   "best", outside the job's own partition), raised by one conditional write per improving metrics
#   event as events are saved (services/jobs.py `_save_event`); one GetItem to read.
# * final, and curves: the newest metrics events, read newest first from the job's partition with a
#   `type = metrics` filter, at most REWARD_WINDOW events evaluated.
# * jobs whose events predate the summary: best over that same bounded window.
REWARDS_SUFFIX = "#rewards"
REWARDS_BEST = "best"
REWARD_WINDOW = 200


def rewards_key(job_id: str) -> str:
    return f"{job_id}{REWARDS_SUFFIX}"


def reward_of(data: dict | None) -> float | None:
    """A metrics event's reward (`critic_rewards_mean`), if it is a finite number."""
    value = (data or {}).get("critic_rewards_mean")
    return numbers.finite(value)     # never OverflowError on a huge int


def _newest_rewards(job_id: str, count: int) -> list[float]:
    """Rewards of the job's newest `count` metrics events, newest first; evaluates at most
    REWARD_WINDOW events (fewer when `count` metrics events come sooner)."""
    page_size = 50
    page = pagination.query(JobEvent, job_id, limit=count, filter_condition=JobEvent.type == "metrics",
                            keep=lambda e: reward_of(e.data) is not None, page_size=page_size,
                            max_pages=max(1, REWARD_WINDOW // page_size), what="reward curve")
    return [reward_of(e.data) for e in page.items]


def _stored_best(job_id: str) -> float | None:
    item = dynamo.get_or_none(JobEvent, rewards_key(job_id), REWARDS_BEST, what="best reward")
    return float(item.best_reward) if item is not None and item.best_reward is not None else None


def best_reward(job_id: str) -> float | None:
    best = _stored_best(job_id)
    if best is None:
        window = _newest_rewards(job_id, REWARD_WINDOW)
        best = max(window) if window else None
    return best


def rewards(job_id: str) -> tuple[float | None, float | None]:
    """(final, best) reward of a job, with bounded reads."""
    newest = _newest_rewards(job_id, 1)
    final = newest[0] if newest else None
    best = best_reward(job_id)
    if final is not None and (best is None or final > best):
        best = final
    return final, best


def reward_curve(job_id: str, points: int = 20) -> list[float]:
    """The newest `points` rewards, oldest first (a sparkline's data), with a bounded read."""
    return list(reversed(_newest_rewards(job_id, points)))



# ---- the training watch's verdict on a model (issue #24) --------------------------------------------
#
# A job whose watch raised a critical finding never publishes silently: with `on_critical: cancel`
# its model (if Bedrock finished first) is registered *quarantined* -- not callable, listed or
# aliased -- until the admin releases it with a reason; with `alert` it is *flagged* -- callable,
# but every alias move to it needs the admin's override, which the alias history records.

QUARANTINED, FLAGGED, RELEASED = "quarantined", "flagged", "released"


def verdict(job: Job) -> dict | None:
    """The watch's verdict on a finished job's model, from its critical findings (a consistent
    read: a finding is recorded before the stop it causes)."""
    from chalicelib.services import rollouts, watch

    critical = [f for f in WatchFinding.query(rollouts.job_key(job.team_id, job.job_id), consistent_read=True)
                if f.severity == "critical"]
    stopped = bool(job.cancel_requested) and (job.error or {}).get("code") == watch.STOP_CODE
    if not critical and not stopped:
        return None
    cancel = stopped or job.status != "succeeded" or any(f.action == "cancel" for f in critical)
    return {"state": QUARANTINED if cancel else FLAGGED, "on_critical": "cancel" if cancel else "alert",
            "job_id": job.job_id, "since": ids.now(),
            "findings": [{"code": f.code, "severity": f.severity, "title": f.title, "window": int(f.window),
                          "event_id": f.event_id} for f in critical]}


def quarantined(m: TunedModel | None) -> bool:
    return m is not None and (m.watch or {}).get("state") == QUARANTINED


def apply_verdict(job: Job) -> None:
    """A critical finding recorded after the job's model was registered (Bedrock finished first):
    the model takes the verdict now (never weakening one: a released model stays released)."""
    found = verdict(job)
    model = dynamo.get_or_none(TunedModel, job.team_id, job.fine_tuned_model or "", what="tuned model") \
        if job.fine_tuned_model else None
    if found is None or model is None or (model.watch or {}).get("state") in (QUARANTINED, RELEASED) \
            or ((model.watch or {}).get("state") == FLAGGED and found["state"] == FLAGGED):
        return
    try:
        model.update(actions=[TunedModel.watch.set(found)], condition=TunedModel.watch.does_not_exist()
                     | (TunedModel.watch == model.watch))
    except UpdateError:
        return      # changed concurrently (released or quarantined by another caller)
    _resolved.invalidate()


def release(team_id: str, model_id: str, reason: str, released_by: str = "admin") -> dict:
    """The admin releases a quarantined (or flagged) model with a reason: callable again, the
    release on the model and on the bus (`rft-hub.model.released`), and, when the job's suffix
    alias is free, that alias pointed at it with the reason in its history."""
    try:
        model = TunedModel.get(team_id, model_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound(f"No tuned model '{model_id}' in this team.", param="model", code="model_not_found") from None
    state = (model.watch or {}).get("state")
    if state == RELEASED:
        return tuned_view(model)            # idempotent
    if state not in (QUARANTINED, FLAGGED):
        raise Conflict(f"Model '{model_id}' has no training watch verdict to release.", param="model",
                       code="model_not_quarantined")
    released = {**model.watch, "state": RELEASED, "released_from": state, "released_by": released_by,
                "reason": reason, "released_at": ids.now()}
    event = outbox.stage("rft-hub.model.released", team_id, model=model_id, job_id=model.job_id,
                         released_from=state, released_by=released_by, reason=reason,
                         findings=[f.get("code") for f in model.watch.get("findings") or []])
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.update(model, actions=[TunedModel.watch.set(released)], condition=TunedModel.watch == model.watch)
            tx.save(event)
    except TransactWriteError:
        raise Conflict(f"Model '{model_id}' changed concurrently; retry.", param="model") from None
    outbox.publish([event])
    _resolved.invalidate()
    model.watch = released
    job = dynamo.get_or_none(Job, team_id, model.job_id, what="job")
    if job is not None and job.suffix:
        try:
            point_alias(team_id, job.suffix, model_id, changed_by=released_by, only_if_new=True, admin=True,
                        override_reason=f"released from the training watch's {state}: {reason}")
        except Conflict:
            logger.info("alias exists; not moved by the release", extra={"alias": job.suffix, "model": model_id})
    return tuned_view(model)


def register(job: Job) -> TunedModel | None:
    """Idempotent: registers the job's model once, with the training watch's verdict, and gives it
    the job's suffix as an alias when that alias is free and the watch found nothing critical (an
    existing alias is only moved by an explicit promote)."""
    if not job.fine_tuned_model:
        logger.warning("succeeded job without a model", extra={"job_id": job.job_id})
        return None
    try:
        return TunedModel.get(job.team_id, job.fine_tuned_model, consistent_read=True)
    except DoesNotExist:
        pass
    final, best = rewards(job.job_id)
    checkpoints = [{"id": c.checkpoint_id, "model": c.fine_tuned_model_checkpoint, "step": c.step_number}
                   for c in Checkpoint.query(job.job_id)]
    judged = verdict(job)
    model = TunedModel(job.team_id, job.fine_tuned_model, base_model=job.model, job_id=job.job_id,
                       grader=job.method.get("reinforcement", {}).get("grader", {}), final_reward=final,
                       best_reward=best, checkpoints=checkpoints, created_at=ids.now(), watch=judged)
    event = outbox.stage("rft-hub.model.registered", job.team_id, model=model.model_id, base_model=job.model,
                         job_id=job.job_id, final_reward=final, best_reward=best,
                         watch=judged["state"] if judged else None)
    try:
        with TransactWrite(connection=connection()) as tx:
            tx.save(model, condition=TunedModel.model_id.does_not_exist())
            tx.save(event)
    except TransactWriteError:
        return TunedModel.get(job.team_id, job.fine_tuned_model, consistent_read=True)
    outbox.publish([event])
    _resolved.invalidate()
    if judged is not None:
        logger.warning("model registered under the training watch's verdict",
                       extra={"job_id": job.job_id, "model": model.model_id, "state": judged["state"]})
        return model
    if job.suffix:
        try:
            point_alias(job.team_id, job.suffix, model.model_id, changed_by=f"job:{job.job_id}", only_if_new=True)
        except Conflict:
            logger.info("alias exists; not moved automatically", extra={"alias": job.suffix, "job_id": job.job_id})
    return model


# ---- aliases ----------------------------------------------------------------------------------

def _owned_target(team_id: str, model_id: str) -> TunedModel:
    """The team's tuned model that is (or holds the checkpoint) `model_id`; 404 otherwise."""
    try:
        return TunedModel.get(team_id, model_id, consistent_read=True)
    except DoesNotExist:
        pass
    for m in TunedModel.query(team_id):
        if any(c.get("model") == model_id for c in m.checkpoints or []):
            return m
    raise NotFound(f"No tuned model or checkpoint '{model_id}' in this team.", param="model")


def _watch_check(model: TunedModel, model_id: str, override_reason: str | None) -> dict | None:
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


KEEP_GATE = object()   # point_alias(gate=KEEP_GATE): the alias's gate stays as it is


def _alias_answer(record: Alias, gate: dict | None, evidence: dict | None) -> dict:
    out = {**alias_view(record), "rft_gate": gate}
    if evidence:
        out["rft_evidence"] = evidence
    return out


def point_alias(team_id: str, alias: str, model_id: str, *, changed_by: str, only_if_new: bool = False,
                gate=KEEP_GATE, override_reason: str | None = None, admin: bool = False) -> dict:
    """Points an alias at a team's tuned model or checkpoint (a new version in its history).

    Promotion gates (services/evals.py): an alias may carry a gate (`gate`: set it; None: remove
    it). Moving a gated alias needs a completed run of the gate's eval on the target that passes
    the gate, else a 409 `gate_failed` naming what failed; the admin may override with a reason.
    Changing or removing an existing gate is the admin's too. The move's evidence (the run, the
    comparison, or the override) is written with the change in one transaction, shown in the
    alias history and sent with the `rft-hub.alias.changed` event."""
    from chalicelib.services import evals   # evals -> gateway -> registry

    if not ALIAS_RE.match(alias or ""):
        raise InvalidRequest("alias must be 1-64 lowercase letters, digits or '-', starting with a letter "
                             "or digit.", param="alias")
    if override_reason is not None and not admin:
        raise evals.Forbidden("Only the admin key may override an alias's gate.", param="override_reason")
    target = _owned_target(team_id, model_id)
    base = target.base_model
    watch_evidence = _watch_check(target, model_id, override_reason)
    now = ids.now()
    try:
        current = Alias.get(team_id, alias, consistent_read=True)
    except DoesNotExist:
        current = None
    if current and only_if_new:
        raise Conflict(f"Alias '{alias}' already exists.", param="alias")
    gate_item = evals.load_gate(team_id, alias)
    existing = gate_item.gate if gate_item else None
    wanted = existing
    if gate is not KEEP_GATE:
        wanted = evals.check_gate(team_id, gate) if gate is not None else None
        if existing is not None and wanted != existing and not admin:
            raise evals.Forbidden(f"Alias '{alias}' is gated; only the admin key may change or remove its gate.",
                                  param="gate")
    gate_changed = wanted != existing
    moving = current is None or current.model_id != model_id
    if not moving and not gate_changed:
        return _alias_answer(current, existing, None)   # idempotent re-point
    evidence = None
    if moving and current is not None and existing is not None:
        if override_reason:
            evidence = {"eval_id": existing["eval_id"], "override_reason": override_reason, "gate": existing}
        else:
            evidence = {**evals.gate_evidence(team_id, alias, existing, model_id, current.model_id), "gate": existing}
    if moving and watch_evidence:
        evidence = {**(evidence or {}), **watch_evidence}
    key = evals.gate_key(team_id, alias)
    gate_unchanged = (AliasGate.updated_at == gate_item.updated_at) if gate_item else AliasGate.entry.does_not_exist()
    record = current
    event = None
    try:
        with TransactWrite(connection=connection()) as tx:
            if moving:
                version = (current.version if current else 0) + 1
                record = Alias(team_id, alias, model_id=model_id, base_model=base, version=version, updated_at=now)
                change = AliasChange(f"{team_id}#{alias}", version, model_id=model_id, base_model=base,
                                     previous_model_id=current.model_id if current else None, changed_by=changed_by,
                                     changed_at=now)
                extra = {k: evidence.get(k) for k in ("eval_id", "eval_run_id", "baseline_run_id", "comparison",
                                                      "override_reason")} if evidence else {}
                event = outbox.stage("rft-hub.alias.changed", team_id, alias=alias, model=model_id, version=version,
                                     previous_model=change.previous_model_id, changed_by=changed_by, **extra)
                tx.save(record, condition=(Alias.version == current.version) if current else
                        Alias.alias.does_not_exist())
                tx.save(change, condition=AliasChange.version.does_not_exist())
                tx.save(event)
                if evidence:
                    tx.save(AliasGate(key, f"v{version:09d}", evidence=evidence, updated_at=now, updated_by=changed_by),
                            condition=AliasGate.entry.does_not_exist())
            else:
                tx.condition_check(Alias, team_id, alias, condition=Alias.version == current.version)
            if gate_changed and wanted is None:
                tx.delete(gate_item, condition=gate_unchanged)
            elif gate_changed:
                tx.save(AliasGate(key, "gate", gate=wanted, updated_at=now, updated_by=changed_by),
                        condition=gate_unchanged)
            else:       # the gate this move was checked against is still the alias's gate
                tx.condition_check(AliasGate, key, "gate", condition=gate_unchanged)
    except TransactWriteError:
        raise Conflict(f"Alias '{alias}' changed concurrently; retry.", param="alias") from None
    if event is not None:
        outbox.publish([event])
    _resolved.invalidate((team_id, alias))
    if event is not None:   # Amazon Nova: deployments follow the aliases (services/nova.py)
        _deployments_follow(team_id, record, current)
    return _alias_answer(record, wanted, evidence)


def alias_history(team_id: str, alias: str) -> dict:
    from chalicelib.services import evals

    changes = [change_view(c) for c in AliasChange.query(f"{team_id}#{alias}", scan_index_forward=False)]
    if not changes:
        raise NotFound(f"No alias '{alias}'.", param="alias")
    # What justified each move: the gate's eval run and comparison, or the admin's override.
    evidence = evals.move_evidence(team_id, alias, [c["version"] for c in changes])
    for change in changes:
        found = evidence.get(change["version"])
        if found:
            change.update({k: found.get(k) for k in ("eval_id", "eval_run_id", "baseline_run_id", "comparison",
                                                     "override_reason", "watch") if k in found or k != "watch"})
    return {"object": "list", "data": changes}


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

def _deployments_follow(team_id: str, record: Alias, previous: Alias | None) -> None:
    """The alias's new model is deployed if it has no deployment; the model it left loses its
    deployment if no alias points at it any more. Only Nova models have deployments."""
    from chalicelib.services import nova

    if nova.handles(record.base_model) or (previous is not None and nova.handles(previous.base_model)):
        nova.on_alias_moved(team_id, record.model_id, previous.model_id if previous else None)


def retire(team_id: str, model_id: str) -> dict:
    """Retires a team's tuned model: no longer listed or callable by its id (its alias history
    keeps it). Refused (409 `model_in_use`) while an alias points at it; an Amazon Nova model's
    deployment is deleted. The answer is OpenAI's model deletion object."""
    from chalicelib.services import nova

    try:
        model = TunedModel.get(team_id, model_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound(f"No tuned model '{model_id}' in this team.", param="model", code="model_not_found") from None
    pointing = sorted(a.alias for a in Alias.query(team_id) if a.model_id == model_id)
    if pointing:
        raise Conflict(f"Alias(es) {', '.join(pointing)} point at '{model_id}'; point them elsewhere first.",
                       param="model", code="model_in_use")
    if nova.handles(model.base_model):
        nova.release_deployment(team_id, model_id, reason="The model was retired.")
    model.delete()
    _resolved.invalidate((team_id, model_id))
    return {"id": model_id, "object": "model", "deleted": True}
