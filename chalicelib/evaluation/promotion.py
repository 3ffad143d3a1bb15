"""Moving an alias: a new version in its history, checked against the alias's promotion gate
(evaluation/gates.py) and the training watch's verdict on the target, with the evidence that
justified it in the same transaction; the history as read; the admin's release of a model the
watch quarantined; and the suffix alias a succeeded job gets (a reaction to training's event)."""
from __future__ import annotations

from pynamodb.exceptions import DoesNotExist, TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib import outbox
from chalicelib.domain import ids
from chalicelib.domain.events import JobSucceeded
from chalicelib.errors import Conflict, Forbidden, InvalidRequest, NotFound
from chalicelib.evaluation import gates
from chalicelib.inference import registry
from chalicelib.log import logger
from chalicelib.platform import audit
from chalicelib.store import dynamo
from chalicelib.store.models import Alias, AliasChange, AliasGate, Job, TunedModel, connection

KEEP_GATE = object()   # point_alias(gate=KEEP_GATE): the alias's gate stays as it is


def _alias_answer(record: Alias, gate: dict | None, evidence: dict | None) -> dict:
    out = {**registry.alias_view(record), "rft_gate": gate}
    if evidence:
        out["rft_evidence"] = evidence
    return out


def point_alias(team_id: str, alias: str, model_id: str, *, changed_by: str, only_if_new: bool = False,
                gate=KEEP_GATE, override_reason: str | None = None, admin: bool = False) -> dict:
    """Points an alias at a team's tuned model or checkpoint (a new version in its history).

    Promotion gates (evaluation/gates.py): an alias may carry a gate (`gate`: set it; None: remove
    it). Moving a gated alias needs a completed run of the gate's eval on the target that passes
    the gate, else a 409 `gate_failed` naming what failed; the admin may override with a reason.
    Changing or removing an existing gate is the admin's too. The move's evidence (the run, the
    comparison, or the override) is written with the change in one transaction, shown in the
    alias history and sent with the `rft-hub.alias.changed` event."""
    if not registry.ALIAS_RE.match(alias or ""):
        raise InvalidRequest("alias must be 1-64 lowercase letters, digits or '-', starting with a letter "
                             "or digit.", param="alias")
    if override_reason is not None and not admin:
        raise Forbidden("Only the admin key may override an alias's gate.", param="override_reason")
    target = registry.owned_target(team_id, model_id)
    base = target.base_model
    watch_evidence = registry.watch_check(target, model_id, override_reason)
    now = ids.now()
    try:
        current = Alias.get(team_id, alias, consistent_read=True)
    except DoesNotExist:
        current = None
    if current and only_if_new:
        raise Conflict(f"Alias '{alias}' already exists.", param="alias")
    gate_item = gates.load_gate(team_id, alias)
    existing = gate_item.gate if gate_item else None
    wanted = existing
    if gate is not KEEP_GATE:
        wanted = gates.check_gate(team_id, gate) if gate is not None else None
        if existing is not None and wanted != existing and not admin:
            raise Forbidden(f"Alias '{alias}' is gated; only the admin key may change or remove its gate.",
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
            evidence = {**gates.gate_evidence(team_id, alias, existing, model_id, current.model_id), "gate": existing}
    if moving and watch_evidence:
        evidence = {**(evidence or {}), **watch_evidence}
    # The audit log (issue #29): a gate set, changed or removed, or a gate overridden by the admin,
    # is one entry in this same transaction.
    act = None
    overrode_gate = bool(override_reason) and moving and existing is not None and current is not None
    overrode_flag = moving and bool(watch_evidence) and watch_evidence["watch"].get("state") == registry.FLAGGED
    if overrode_gate or overrode_flag:
        act = audit.Act("alias.override", f"alias:{alias}", team_id,
                        before={"model": current.model_id if current else None, "gate": existing},
                        after={"model": model_id, "gate": wanted, "override_reason": override_reason,
                               "overrode": "gate" if overrode_gate else "watch_flag"})
    elif gate_changed:
        act = audit.Act("gate.set", f"alias:{alias}", team_id, before={"gate": existing}, after={"gate": wanted})
    audited = None
    key = gates.gate_key(team_id, alias)
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
            if act is not None:
                audited = audit.transact_put(tx, act)
    except TransactWriteError as err:
        # Only a failed condition is "changed concurrently"; a throttle or a transaction conflict is
        # a busy DynamoDB (a 503 to retry), never read by a caller as "the alias exists".
        if dynamo.is_busy(err):
            raise dynamo.busy_error("alias") from None
        raise Conflict(f"Alias '{alias}' changed concurrently; retry.", param="alias") from None
    if event is not None:
        outbox.publish([event])
    if audited is not None:
        audit.published(audited)
    registry.forget(team_id, alias)
    if event is not None:   # Amazon Nova: deployments follow the aliases (inference/deployments.py)
        registry.deployments_follow(team_id, record, current)
    return _alias_answer(record, wanted, evidence)


def alias_history(team_id: str, alias: str) -> dict:
    changes = [registry.change_view(c) for c in AliasChange.query(f"{team_id}#{alias}", scan_index_forward=False)]
    if not changes:
        raise NotFound(f"No alias '{alias}'.", param="alias")
    # What justified each move: the gate's eval run and comparison, or the admin's override.
    evidence = gates.move_evidence(team_id, alias, [c["version"] for c in changes])
    for change in changes:
        found = evidence.get(change["version"])
        if found:
            change.update({k: found.get(k) for k in ("eval_id", "eval_run_id", "baseline_run_id", "comparison",
                                                     "override_reason", "watch") if k in found or k != "watch"})
    return {"object": "list", "data": changes}


def release(team_id: str, model_id: str, reason: str, released_by: str = "admin") -> dict:
    """The admin releases a quarantined (or flagged) model with a reason: callable again, the
    release on the model and on the bus (`rft-hub.model.released`), and, when the job's suffix
    alias is free, that alias pointed at it with the reason in its history."""
    model, state = registry.release_model(team_id, model_id, reason, released_by)
    if state is None:
        return registry.tuned_view(model)            # already released: idempotent
    job = dynamo.get_or_none(Job, team_id, model.job_id, what="job")
    if job is not None and job.suffix:
        try:
            point_alias(team_id, job.suffix, model_id, changed_by=released_by, only_if_new=True, admin=True,
                        override_reason=f"released from the training watch's {state}: {reason}")
        except Conflict:
            logger.info("alias exists; not moved by the release", extra={"alias": job.suffix, "model": model_id})
    return registry.tuned_view(model)


def give_suffix_alias(event: JobSucceeded) -> None:
    """A succeeded job's suffix becomes an alias of its model when that alias is free and the
    training watch found nothing critical (an existing alias is only moved by an explicit
    promote). Idempotent (the reconciler repeats finalize until it completes): a busy DynamoDB
    raises, so the step is repeated, never read as "the alias exists"."""
    job = dynamo.get_or_none(Job, event.team_id, event.job_id, what="job", consistent_read=True)
    if job is None or not job.suffix or not job.fine_tuned_model:
        return
    model = dynamo.get_or_none(TunedModel, job.team_id, job.fine_tuned_model, what="tuned model",
                               consistent_read=True)
    if model is None or model.watch:
        return      # a verdict of the watch: the admin's release gives the alias
    try:
        point_alias(job.team_id, job.suffix, model.model_id, changed_by=f"job:{job.job_id}", only_if_new=True)
    except Conflict:
        logger.info("alias exists; not moved automatically", extra={"alias": job.suffix, "job_id": job.job_id})
