"""Promotion gates: an alias's gate (an eval, its pinned data and settings, criteria), the check
of a move against it, and the evidence the move records (evaluation/promotion.py moves aliases)."""
from __future__ import annotations

import os
from typing import Any

from chalicelib.domain import evals as rules
from chalicelib.errors import Conflict, InvalidRequest, NotFound
from chalicelib.evaluation.evals import apply_rules, check_rows, get_eval, rows_sha256, source_rows
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import AliasGate, EvalDefinition, EvalRunRecord


def gate_key(team_id: str, alias: str) -> str:
    return f"{team_id}#{alias}"


def load_gate(team_id: str, alias: str) -> AliasGate | None:
    return dynamo.get_or_none(AliasGate, gate_key(team_id, alias), "gate", consistent_read=True, what="alias gate")


GATE_KEYS = ("data_source", "min_items")


def gate_min_items() -> int:
    """The fewest items a gate's data may have (RFT_GATE_MIN_ITEMS): a gate on a handful of
    items says little; a team's gate may ask for more, never fewer."""
    return int(os.environ.get("RFT_GATE_MIN_ITEMS", "20"))


def check_gate(team_id: str, raw: Any) -> dict:
    """A gate as sent on POST /v1/models/aliases, checked against its eval's testing criteria and
    pinned: the data it is judged on (a file by id and content hash, or inline rows by their
    hash), the input messages, the sampling parameters and a minimum item count. Only runs made
    with exactly those count as evidence."""
    if not isinstance(raw, dict) or not isinstance(raw.get("eval_id"), str):
        raise InvalidRequest("gate must be {\"eval_id\", \"criteria\": {<criterion>: <min score>}, "
                             "\"no_worse_than_current\": true|false, \"data_source\": {\"source\", \"input_messages\", "
                             "\"sampling_params\"}, \"min_items\"}.", param="gate.eval_id")
    try:
        ev = get_eval(team_id, raw["eval_id"], param="gate.eval_id")
    except NotFound as err:
        raise InvalidRequest(err.message, param="gate.eval_id") from None
    checked = apply_rules(rules.check_gate, {k: v for k, v in raw.items() if k not in GATE_KEYS},
                     [c["name"] for c in ev.testing_criteria])
    return {**checked, **_pin(team_id, ev, raw.get("data_source"), raw.get("min_items"))}


def _pin(team_id: str, ev: EvalDefinition, raw: Any, min_items: Any) -> dict:
    floor = gate_min_items()
    if min_items is None:
        min_items = floor
    if isinstance(min_items, bool) or not isinstance(min_items, int) or not floor <= min_items <= rules.MAX_ITEMS:
        raise InvalidRequest(f"gate.min_items must be an integer from {floor} to {rules.MAX_ITEMS:,}.",
                             param="gate.min_items")
    if not isinstance(raw, dict):
        raise InvalidRequest("gate.data_source is required: the data the gate's runs must use, {\"source\": "
                             "{\"type\": \"file_id\", \"id\"} | {\"type\": \"file_content\", \"content\"}, "
                             "\"input_messages\", \"sampling_params\"}.", param="gate.data_source")
    extra = sorted(set(raw) - {"type", "source", "input_messages", "sampling_params"})
    if extra or raw.get("type", "completions") != "completions":
        name = extra[0] if extra else "type"
        raise InvalidRequest(f"Unknown field 'gate.data_source.{name}' (a gate pins source, input_messages and "
                             "sampling_params; the model is the alias's target).", param=f"gate.data_source.{name}")
    # As a run's data source is checked, the model being the one a move names.
    ds = apply_rules(rules.check_data_source, {**raw, "type": "completions", "model": "gate"}, prefix="gate")
    try:
        rows = source_rows(team_id, ds, param="gate.data_source.source")
    except NotFound as err:
        raise InvalidRequest(err.message, param="gate.data_source.source.id") from None
    check_rows(ev, ds, rows)
    if len(rows) < min_items:
        raise InvalidRequest(f"The gate's data has {len(rows)} items; a gate needs at least {min_items}.",
                             param="gate.data_source.source")
    view = rules.data_source_view(ds)
    source = {"type": "file_id", "id": ds.source["id"]} if ds.source["type"] == "file_id" else \
        {"type": "file_content"}
    return {"data_source": {"source": {**source, "sha256": rows_sha256(rows), "items": len(rows)},
                            "input_messages": view["input_messages"], "sampling_params": view["sampling_params"]},
            "min_items": min_items}


def _made_as_pinned(run: EvalRunRecord, gate: dict) -> bool:
    """Whether a run was made with the gate's data, input messages and sampling parameters, and
    graded at least its minimum number of items."""
    pin = gate.get("data_source") or {}
    stored = run.data_source or {}
    source, ran = pin.get("source") or {}, stored.get("source") or {}
    return (stored.get("type") == "completions" and ran.get("type") == source.get("type")
            and (source.get("type") != "file_id" or ran.get("id") == source.get("id"))
            and run.data_sha256 is not None and run.data_sha256 == source.get("sha256")
            and stored.get("input_messages") == pin.get("input_messages")
            and stored.get("sampling_params") == pin.get("sampling_params")
            and int(((run.summary or {}).get("result_counts") or {}).get("total") or 0) >= int(gate["min_items"]))


def newest_completed(eval_id: str, model: str, gate: dict) -> EvalRunRecord | None:
    """The newest completed run of the eval that sampled `model` (resolved when it was created)
    and was made as the gate pins it."""
    page = pagination.query(EvalRunRecord, eval_id, limit=1, newest_first=True,
                            filter_condition=(EvalRunRecord.status == "completed") &
                            (EvalRunRecord.upstream_model == model),
                            keep=lambda run: _made_as_pinned(run, gate), page_size=100, max_pages=10,
                            what="gate runs")
    return page.items[0] if page.items else None


def _pinned_text(gate: dict) -> str:
    source = gate["data_source"]["source"]
    data = f"file '{source['id']}'" if source["type"] == "file_id" else "the gate's inline rows"
    return (f"{data} (sha256 {source['sha256'][:12]}...), the gate's input_messages and sampling_params, "
            f"at least {gate['min_items']} items")


def gate_evidence(team_id: str, alias: str, gate: dict, target: str, current: str | None) -> dict:
    """The run that lets `alias` move from `current` to `target` under `gate`, and the comparison;
    a 409 naming every reason when there is none."""
    def refuse(reasons: list[str]) -> Conflict:
        return Conflict(f"Alias '{alias}' is gated by eval '{gate['eval_id']}' and cannot move to '{target}': "
                        + "; ".join(reasons) + ". An admin may override with \"override_reason\".",
                        param="model", code="gate_failed")
    try:
        get_eval(team_id, gate["eval_id"])
    except NotFound:
        raise refuse([f"the gate's eval '{gate['eval_id']}' no longer exists"]) from None
    if not gate.get("data_source") or not gate.get("min_items"):
        # A gate set before gates were pinned binds nothing: no run counts until an admin pins it.
        raise refuse(["the gate pins no data source; an admin must set it again with gate.data_source"])
    run = newest_completed(gate["eval_id"], target, gate)
    if run is None:
        raise refuse([(f"no completed run of the eval on '{target}' made with {_pinned_text(gate)} (create one "
                       f"with data_source.model = '{target}' and the gate's data_source)")])
    baseline = None
    if gate["no_worse_than_current"] and current:
        baseline = newest_completed(gate["eval_id"], current, gate)
        if baseline is None:
            raise refuse([(f"no_worse_than_current needs a completed run of the eval on the current model "
                           f"'{current}' made with {_pinned_text(gate)}")])
    failures, comparison = rules.gate_failures(gate, run.summary, baseline.summary if baseline else None)
    if failures:
        raise refuse([f"run {run.run_id}: {f}" for f in failures])
    return {"eval_id": gate["eval_id"], "eval_run_id": run.run_id,
            "baseline_run_id": baseline.run_id if baseline else None, "comparison": comparison}


def move_evidence(team_id: str, alias: str, versions: list[int]) -> dict[int, dict]:
    """What justified each version of an alias (the alias history shows it)."""
    if not versions:
        return {}
    keys = [(gate_key(team_id, alias), f"v{v:09d}") for v in versions]
    found = dynamo.call(lambda: list(AliasGate.batch_get(keys)), idempotent=True, what="alias evidence")
    return {int(e.entry[1:]): dict(e.evidence or {}) for e in found}
