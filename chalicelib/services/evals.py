"""Evals as a service (OpenAI's Evals API): evals, runs on base, tuned and checkpoint models (or
on given outputs), per-item results, comparisons, promotion gates on aliases, and the eval a
fine-tuning job names (`rft_eval`).

This is the control plane: a run is recorded here and queued (`enqueue`); the eval worker
(services/eval_worker.py, an SQS-triggered function) runs it, resumably, with every model call
metered. A queued run not picked up in time is queued again when it is read (`_repair`).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any

from pynamodb.exceptions import DeleteError, DoesNotExist, PutError, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.adapters import aws
from chalicelib.config import evals_queue
from chalicelib.domain import evals as rules
from chalicelib.domain import ids, numbers, pricing
from chalicelib.domain.datasets import iter_lines, parse_json
from chalicelib.errors import ApiError, Conflict, InvalidRequest, NotFound, ServiceUnavailable
from chalicelib.log import logger
from chalicelib.services import files, graders, outbox
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import (AliasGate, EvalDefinition, EvalOutputItem, EvalRunRecord, Job, JobEvalLink,
                                     TunedModel, connection)

REQUEUE_AFTER_S = 120           # a queued run not picked up this long is queued again when read
NO_ERROR = {"code": "", "message": ""}   # OpenAI's document requires the error object; empty = none
RUN_PREFIX = "evalrun_"
ITEM_PREFIX = "outputitem_"


class Forbidden(ApiError):
    status = 403
    code = "permission_denied"
    should_retry = False


def _invalid(exc: rules.EvalRuleError, prefix: str = "") -> InvalidRequest:
    param = exc.param
    if prefix and param:
        param = f"{prefix}.{param}"
    return InvalidRequest(exc.message, param=param)


def _rules(fn, *args, prefix: str = ""):
    try:
        return fn(*args)
    except rules.EvalRuleError as exc:
        raise _invalid(exc, prefix) from None


# ---- ids ----------------------------------------------------------------------------------------

def new_eval_id() -> str:
    return "eval_" + secrets.token_hex(16)


def new_run_id(created_ms: int | None = None, seed: str | None = None) -> str:
    """`evalrun_<created ms, 12 hex><20 hex>`: runs sort by creation; a seed makes it deterministic."""
    tail = hashlib.sha256(seed.encode()).hexdigest()[:20] if seed else secrets.token_hex(10)
    return f"{RUN_PREFIX}{(created_ms or ids.now_ms()):012x}{tail}"


def output_item_id(run_id: str, index: int) -> str:
    return f"{ITEM_PREFIX}{run_id[len(RUN_PREFIX):]}_{index}"


def _item_index(run_id: str, item_id: str) -> int | None:
    prefix = f"{ITEM_PREFIX}{run_id[len(RUN_PREFIX):]}_"
    tail = item_id[len(prefix):] if item_id.startswith(prefix) else ""
    return numbers.ascii_int(tail)


# ---- views --------------------------------------------------------------------------------------

def eval_view(e: EvalDefinition) -> dict:
    return {"object": "eval", "id": e.eval_id, "name": e.name, "created_at": e.created_at,
            "data_source_config": rules.config_view(e.data_source_config), "testing_criteria": e.testing_criteria,
            "metadata": e.metadata or {}}


def report_path(eval_id: str, run_id: str) -> str:
    """rft-hub's own view of a run (the console, which is not built yet: the URL may 404 until it is)."""
    return f"/console/evals/{eval_id}/runs/{run_id}"


def run_view(r: EvalRunRecord, base_url: str = "") -> dict:
    s = r.summary or {}
    return {"object": "eval.run", "id": r.run_id, "eval_id": r.eval_id, "status": r.status, "model": r.model,
            "name": r.name, "created_at": r.created_at, "report_url": base_url + report_path(r.eval_id, r.run_id),
            "result_counts": s.get("result_counts") or {"total": 0, "errored": 0, "failed": 0, "passed": 0},
            "per_model_usage": s.get("per_model_usage") or [],
            "per_testing_criteria_results": s.get("per_testing_criteria_results") or [],
            "data_source": r.data_source, "metadata": r.metadata or {}, "error": r.error or dict(NO_ERROR),
            # rft-hub extras
            "rft_upstream_model": r.upstream_model, "rft_cost_usd": pricing.usd(int(s.get("cost_micro") or 0)),
            "rft_max_usd": pricing.usd(r.max_micro) if r.max_micro is not None else None,
            "rft_job_id": r.job_id, "rft_role": r.role, "rft_started_at": r.started_at,
            "rft_finished_at": r.finished_at}


def item_view(i: EvalOutputItem) -> dict:
    return {"object": "eval.run.output_item", "id": output_item_id(i.run_id, int(i.item_index)), "run_id": i.run_id,
            "eval_id": i.eval_id, "created_at": i.created_at, "status": i.status,
            "datasource_item_id": int(i.item_index), "datasource_item": i.datasource_item, "results": i.results,
            "sample": i.sample, "rft_cost_usd": pricing.usd(int(i.cost_micro or 0))}


def _list(data: list[dict], page: pagination.Page) -> dict:
    # OpenAI's list objects require first_id and last_id as strings: "" on an empty page.
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else "",
            "last_id": data[-1]["id"] if data else "", "has_more": page.has_more,
            "rft_next_cursor": page.cursor if page.has_more else None}


def _empty() -> dict:
    return {"object": "list", "data": [], "first_id": "", "last_id": "", "has_more": False, "rft_next_cursor": None}


def _order(order: str | None) -> bool:
    """newest_first for OpenAI's `order` (asc by default on the Evals API)."""
    if order in (None, "", "asc"):
        return False
    if order == "desc":
        return True
    raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")


# ---- evals ----------------------------------------------------------------------------------------

def _compile(team_id: str, criteria: list[rules.Criterion]) -> list:
    return [graders.compile_spec(c.spec, f"testing_criteria[{i}]", team_id) for i, c in enumerate(criteria)]


def create_eval(team_id: str, body: rules.CreateEval) -> dict:
    _rules(rules.check_metadata, body.metadata)
    cfg = _rules(rules.check_data_source_config, body.data_source_config)
    criteria = _rules(rules.check_criteria, body.testing_criteria)
    _compile(team_id, criteria)
    stored = [c.stored for c in criteria]
    if len(json.dumps(stored)) + len(json.dumps(cfg)) > 300_000:
        raise InvalidRequest("The testing criteria and item schema are larger than 300 KB together.",
                             param="testing_criteria")
    now = ids.now()
    record = EvalDefinition(team_id, new_eval_id(), name=body.name or "", data_source_config=cfg,
                            testing_criteria=stored, metadata=body.metadata, created_at=now, updated_at=now)
    dynamo.call(lambda: record.save(condition=EvalDefinition.eval_id.does_not_exist()), idempotent=True,
                what="eval create")
    return eval_view(record)


def get_eval(team_id: str, eval_id: str, param: str = "eval_id") -> EvalDefinition:
    try:
        return dynamo.call(lambda: EvalDefinition.get(team_id, eval_id, consistent_read=True), idempotent=True,
                           what="eval read")
    except DoesNotExist:
        raise NotFound(f"No eval with id '{eval_id}'.", param=param) from None


def retrieve_eval(team_id: str, eval_id: str) -> dict:
    return eval_view(get_eval(team_id, eval_id))


def update_eval(team_id: str, eval_id: str, body: rules.UpdateEval) -> dict:
    _rules(rules.check_metadata, body.metadata)
    record = get_eval(team_id, eval_id)
    actions = [EvalDefinition.updated_at.set(ids.now())]
    if body.name is not None:
        actions.append(EvalDefinition.name.set(body.name))
    if "metadata" in body.model_fields_set:
        actions.append(EvalDefinition.metadata.set(body.metadata) if body.metadata is not None
                       else EvalDefinition.metadata.remove())
    try:
        dynamo.call(lambda: record.update(actions=actions, condition=EvalDefinition.eval_id.exists()),
                    idempotent=True, what="eval update")
    except UpdateError as exc:
        if dynamo.is_condition(exc):
            raise NotFound(f"No eval with id '{eval_id}'.", param="eval_id") from None
        raise
    return eval_view(record)


def list_evals(team_id: str, limit: int, after: str | None, order: str | None, order_by: str | None) -> dict:
    if order_by not in (None, "", "created_at"):
        raise InvalidRequest("order_by=updated_at is not supported; evals are listed by created_at.",
                             param="order_by")
    newest_first = _order(order)

    start = pagination.resume_at(after, EvalDefinition, hash_value=team_id, index="by_created",
                                 anchor=lambda eval_id: dynamo.get_or_none(EvalDefinition, team_id, eval_id,
                                                                           what="eval list"))
    if start is pagination.NOWHERE:
        return _empty()
    page = pagination.query(EvalDefinition, team_id, index="by_created", limit=limit, start=start,
                            newest_first=newest_first, what="eval list")
    return _list([eval_view(e) for e in page.items], page)


def delete_eval(team_id: str, eval_id: str) -> dict:
    record = get_eval(team_id, eval_id)
    try:
        dynamo.call(lambda: record.delete(condition=EvalDefinition.eval_id.exists()), idempotent=True,
                    what="eval delete")
    except DeleteError as exc:
        if not dynamo.is_condition(exc):
            raise
    # Its runs (a running one stops at its next item: the run is gone) and their items, off the request path.
    if not _send({"purge_eval": eval_id, "team_id": team_id}):
        logger.warning("eval purge not queued; its runs stay unreachable until purged", extra={"eval_id": eval_id})
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# ---- runs ---------------------------------------------------------------------------------------

def _rows(team_id: str, ds: rules.DataSource, param: str = "data_source.source") -> list[tuple[int, dict, dict | None]]:
    """(index, item, sample) of every row of the run's source, at most MAX_ITEMS."""
    if ds.source["type"] == "file_content":
        return [(i, *rules.split_row(row)) for i, row in enumerate(ds.source["content"])]
    try:
        record = files.get_file(team_id, ds.source["id"])
    except NotFound as err:
        # 400, as OpenAI's document lists for this operation; another team's file reads the same.
        raise InvalidRequest(err.message, param=f"{param}.id") from None
    rows = int((record.validation or {}).get("rows") or 0)
    if rows > rules.MAX_ITEMS:
        raise InvalidRequest(f"File '{ds.source['id']}' has {rows:,} rows; a run takes at most {rules.MAX_ITEMS:,}.",
                             param=f"{param}.id")
    out = []
    for line in iter_lines(files.open_content(record)):
        if not line.strip():
            continue
        if len(out) >= rules.MAX_ITEMS:
            raise InvalidRequest(f"A run takes at most {rules.MAX_ITEMS:,} items.", param=f"{param}.id")
        try:
            item, sample = rules.split_row(parse_json(line))
        except (ValueError, rules.EvalRuleError):
            raise InvalidRequest(f"File '{ds.source['id']}' line {len(out) + 1} is not a JSON object.",
                                 param=f"{param}.id") from None
        out.append((len(out), item, sample))
    if not out:
        raise InvalidRequest(f"File '{ds.source['id']}' has no rows.", param=f"{param}.id")
    return out


def rows_sha256(rows: list) -> str:
    """The identity of a run's data: a hash of its rows as read (items and given samples), the
    same for a file and for inline content with the same rows."""
    digest = hashlib.sha256()
    for _, item, sample in rows:
        digest.update(json.dumps([item, sample], sort_keys=True, separators=(",", ":"),
                                 ensure_ascii=False).encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()


def _check_rows(ev: EvalDefinition, ds: rules.DataSource, rows: list) -> None:
    """The rows against the eval's item schema (and, for jsonl, that each carries its output)."""
    schema = ev.data_source_config.get("item_schema")
    where = "content[{i}]" if ds.source["type"] == "file_content" else "line {n}"
    for index, item, sample in rows:
        label = where.format(i=index, n=index + 1)
        problems = rules.schema_errors(schema, item)
        if problems:
            raise InvalidRequest(f"data_source.source {label} does not match the eval's item_schema: "
                                 f"{'; '.join(problems[:3])}.", param="data_source.source")
        if ds.type == "jsonl" and rules.sample_text(sample) is None:
            raise InvalidRequest(f"data_source.source {label} has no sample output (jsonl runs grade given outputs).",
                                 param="data_source.source")


def create_run(team_id: str, eval_id: str, body: rules.CreateRun, key_id: str | None, *, job_id: str | None = None,
               role: str | None = None, run_id: str | None = None) -> tuple[int, dict]:
    ev = get_eval(team_id, eval_id)
    _rules(rules.check_metadata, body.metadata)
    ds = _rules(rules.check_data_source, body.data_source)
    cap = _rules(rules.cap_micro, body)
    criteria = _rules(rules.criteria_from_stored, ev.testing_criteria)
    _compile(team_id, criteria)          # judges still callable, Lambda graders still registered
    rows = _rows(team_id, ds)
    _check_rows(ev, ds, rows)
    upstream = base = alias = None
    if ds.type == "completions":
        from chalicelib.services import gateway

        try:
            target, _ = gateway.priced(team_id, ds.model, "data_source.model")
        except NotFound as err:
            raise InvalidRequest(err.message, param="data_source.model", code="model_not_found") from None
        upstream, base, alias = target.upstream, target.base_model, target.alias
    now = ids.now()
    record = EvalRunRecord(eval_id, run_id or new_run_id(), team_id=team_id, status="queued",
                           name=body.name or (ds.model if ds.type == "completions" else "jsonl"),
                           model=ds.model or "", upstream_model=upstream, base_model=base, alias=alias,
                           data_source=rules.data_source_view(ds), metadata=body.metadata, created_at=now,
                           updated_at=now, summary=rules.Tally([c.name for c in criteria]).summary(), max_micro=cap,
                           key_id=key_id, job_id=job_id, role=role, data_sha256=rows_sha256(rows))
    try:
        dynamo.call(lambda: record.save(condition=EvalRunRecord.run_id.does_not_exist()), idempotent=True,
                    what="eval run create")
    except PutError as exc:
        if not dynamo.is_condition(exc) or job_id is None:
            raise
        record = _run(eval_id, record.run_id)       # a job's run, created by an earlier finalize
    if record.status == "queued":
        enqueue(record)
    return 201, run_view(record)


def _run(eval_id: str, run_id: str) -> EvalRunRecord | None:
    if not isinstance(run_id, str) or not run_id.startswith(RUN_PREFIX) or len(run_id) > 64:
        return None
    return dynamo.get_or_none(EvalRunRecord, eval_id, run_id, consistent_read=True, what="eval run read")


def get_run(team_id: str, eval_id: str, run_id: str, param: str = "run_id") -> EvalRunRecord:
    get_eval(team_id, eval_id)
    record = _run(eval_id, run_id)
    if record is None or record.team_id != team_id:
        raise NotFound(f"No run '{run_id}' in eval '{eval_id}'.", param=param)
    return record


def retrieve_run(team_id: str, eval_id: str, run_id: str, base_url: str = "") -> dict:
    record = get_run(team_id, eval_id, run_id)
    _repair(record)
    return run_view(record, base_url)


def _repair(record: EvalRunRecord) -> None:
    """Reads repair what a lost message would leave: a queued run no worker took, or a run whose
    worker died (its lease ran out) is queued again, at most once per REQUEUE_AFTER_S."""
    now = ids.now()
    stale = record.status == "queued" and now - (record.enqueued_at or record.created_at) > REQUEUE_AFTER_S or \
        record.status == "in_progress" and (record.lease_until or 0) < now and \
        now - (record.enqueued_at or 0) > REQUEUE_AFTER_S
    if stale:
        enqueue(record)


def list_runs(team_id: str, eval_id: str, limit: int, after: str | None, order: str | None,
              status: str | None) -> dict:
    get_eval(team_id, eval_id)
    if status not in (None, "") and status not in rules.STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(rules.STATUSES)}.", param="status")
    newest_first = _order(order)
    start = pagination.resume_at(after, EvalRunRecord, hash_value=eval_id, anchor=lambda rid: _run(eval_id, rid))
    if start is pagination.NOWHERE:
        return _empty()
    if status:
        page = pagination.query(EvalRunRecord, eval_id, limit=limit, start=start, newest_first=newest_first,
                                filter_condition=EvalRunRecord.status == status, page_size=100, what="eval runs")
    else:
        page = pagination.query(EvalRunRecord, eval_id, limit=limit, start=start, newest_first=newest_first,
                                what="eval runs")
    return _list([run_view(r) for r in page.items], page)


def cancel_run(team_id: str, eval_id: str, run_id: str, base_url: str = "") -> dict:
    record = get_run(team_id, eval_id, run_id)
    if record.status == "canceled":
        return run_view(record, base_url)
    if record.status in rules.TERMINAL:
        raise Conflict(f"Run '{run_id}' already {record.status}; only a queued or running run can be canceled.",
                       param="run_id", code="run_finished")
    now = ids.now()
    try:
        dynamo.call(lambda: record.update(
            actions=[EvalRunRecord.status.set("canceled"), EvalRunRecord.finished_at.set(now),
                     EvalRunRecord.updated_at.set(now)],
            condition=EvalRunRecord.status.is_in("queued", "in_progress")), idempotent=True, what="eval run cancel")
    except UpdateError as exc:
        if not dynamo.is_condition(exc):
            raise
        record = get_run(team_id, eval_id, run_id)
        if record.status != "canceled":
            raise Conflict(f"Run '{run_id}' already {record.status}.", param="run_id", code="run_finished") from None
    # A running worker sees it before its next item and stops; what is in flight is still stored.
    return run_view(record, base_url)


def delete_run(team_id: str, eval_id: str, run_id: str) -> dict:
    record = get_run(team_id, eval_id, run_id)
    try:
        dynamo.call(lambda: record.delete(condition=EvalRunRecord.run_id.exists()), idempotent=True,
                    what="eval run delete")
    except DeleteError as exc:
        if not dynamo.is_condition(exc):
            raise
    if not _send({"purge_run": run_id, "eval_id": eval_id, "team_id": team_id}):
        logger.warning("run purge not queued; its items stay unreachable", extra={"run_id": run_id})
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


def list_items(team_id: str, eval_id: str, run_id: str, limit: int, after: str | None, order: str | None,
               status: str | None) -> dict:
    get_run(team_id, eval_id, run_id)
    if status not in (None, "", "pass", "fail"):
        raise InvalidRequest("status must be 'pass' or 'fail'.", param="status")
    newest_first = _order(order)
    start = None
    if pagination.is_cursor(after):
        start = pagination.decode_cursor(after, EvalOutputItem, hash_value=run_id)
    elif after:
        index = _item_index(run_id, after)
        if index is None:
            return _empty()
        start = {"run_id": {"S": run_id}, "item_index": {"N": str(index)}}
    if status:
        page = pagination.query(EvalOutputItem, run_id, limit=limit, start=start, newest_first=newest_first,
                                filter_condition=EvalOutputItem.status == status, page_size=100,
                                what="eval output items")
    else:
        page = pagination.query(EvalOutputItem, run_id, limit=limit, start=start, newest_first=newest_first,
                                what="eval output items")
    return _list([item_view(i) for i in page.items], page)


def retrieve_item(team_id: str, eval_id: str, run_id: str, item_id: str) -> dict:
    get_run(team_id, eval_id, run_id)
    index = _item_index(run_id, item_id)
    try:
        if index is None:
            raise DoesNotExist()
        return item_view(dynamo.call(lambda: EvalOutputItem.get(run_id, index), idempotent=True,
                                     what="eval output item"))
    except DoesNotExist:
        raise NotFound(f"No output item '{item_id}' in run '{run_id}'.", param="output_item_id") from None


def _stored(run_id: str) -> list[EvalOutputItem]:
    return dynamo.call(lambda: list(EvalOutputItem.query(run_id, consistent_read=True)), idempotent=True,
                       what="eval output items")


# ---- comparison ---------------------------------------------------------------------------------

def _brief(r: EvalRunRecord) -> dict:
    s = r.summary or {}
    return {"id": r.run_id, "status": r.status, "model": r.model, "rft_upstream_model": r.upstream_model,
            "result_counts": s.get("result_counts"), "rft_cost_usd": pricing.usd(int(s.get("cost_micro") or 0))}


def _scores(run_id: str) -> dict[int, dict]:
    out = {}
    for item in _stored(run_id):
        output = (item.sample or {}).get("output") or []
        text = output[-1].get("content") if output and isinstance(output[-1], dict) else None
        out[int(item.item_index)] = {"status": item.status, "output_text": (text or "")[:500],
                                     "scores": {r.get("name"): r.get("score") for r in item.results or []}}
    return out


def compare(team_id: str, eval_id: str, runs: str | None, limit: int) -> dict:
    wanted = [r.strip() for r in (runs or "").split(",") if r.strip()]
    if len(wanted) != 2 or wanted[0] == wanted[1]:
        raise InvalidRequest("runs must name two runs of this eval: runs=<run id>,<run id>.", param="runs")
    a, b = (get_run(team_id, eval_id, r, param="runs") for r in wanted)
    return {"object": "eval.comparison", "eval_id": eval_id, "runs": [_brief(a), _brief(b)],
            "per_testing_criteria": rules.compare_summaries(a.summary, b.summary),
            "items": rules.disagreements(_scores(a.run_id), _scores(b.run_id), limit),
            "rft_same_data_source": (a.data_source or {}).get("source") == (b.data_source or {}).get("source")}


# ---- the queue ----------------------------------------------------------------------------------

_queue_url: dict[str, str] = {}


def _send(body: dict, delay: int = 0) -> bool:
    try:
        sqs = aws.sqs()
        name = evals_queue()
        if name not in _queue_url:
            _queue_url[name] = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        sqs.send_message(QueueUrl=_queue_url[name], MessageBody=json.dumps(body), DelaySeconds=delay)
        return True
    except Exception as exc:  # noqa: BLE001 - callers decide (reads repair a lost message)
        logger.warning("eval worker message not sent", extra={"error": type(exc).__name__})
        return False


def enqueue(record: EvalRunRecord, delay: int = 0) -> bool:
    sent = _send({"team_id": record.team_id, "eval_id": record.eval_id, "run_id": record.run_id}, delay)
    if sent:
        try:
            dynamo.call(lambda: record.update(actions=[EvalRunRecord.enqueued_at.set(ids.now())],
                                              condition=EvalRunRecord.run_id.exists()),
                        idempotent=True, what="eval run enqueued")
        except (UpdateError, ApiError):
            pass     # only a hint for read repair
    return sent




# ---- the worker ---------------------------------------------------------------------------------



























# ---- promotion gates ----------------------------------------------------------------------------

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
    checked = _rules(rules.check_gate, {k: v for k, v in raw.items() if k not in GATE_KEYS},
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
    ds = _rules(rules.check_data_source, {**raw, "type": "completions", "model": "gate"}, prefix="gate")
    try:
        rows = _rows(team_id, ds, param="gate.data_source.source")
    except NotFound as err:
        raise InvalidRequest(err.message, param="gate.data_source.source.id") from None
    _check_rows(ev, ds, rows)
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


# ---- the eval a fine-tuning job names (rft_eval) -------------------------------------------------

JOB_EVAL_KEYS = {"eval_id", "file_id", "input_messages", "sampling_params", "rft_max_usd"}


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
    _rules(rules.check_input_messages, spec.get("input_messages"), prefix="rft_eval")
    _rules(rules.check_sampling, spec.get("sampling_params"), prefix="rft_eval")
    if spec.get("file_id") is not None:
        try:
            files.get_file(team_id, spec["file_id"])
        except NotFound as err:
            raise InvalidRequest(err.message, param="rft_eval.file_id") from None
    if spec.get("rft_max_usd") is not None:
        _rules(rules.cap_micro, rules.CreateRun(data_source={}, rft_max_usd=spec["rft_max_usd"]), prefix="rft_eval")
    link = JobEvalLink(team_id, job_id, eval_id=spec["eval_id"], options=spec, created_at=ids.now())
    dynamo.call(link.save, idempotent=True, what="job eval")


def start_for_job(job: Job) -> None:
    """A succeeded job's `rft_eval`: one run on the base model, the tuned model and each checkpoint.
    Idempotent (deterministic run ids); raises ServiceUnavailable when a run could not be queued,
    so the job's finalize is repeated by the reconciler."""
    from chalicelib.services import jobs

    try:
        link = dynamo.call(lambda: JobEvalLink.get(job.team_id, job.job_id, consistent_read=True), idempotent=True,
                           what="job eval")
    except DoesNotExist:
        return
    if link.enqueued:
        return
    try:
        get_eval(job.team_id, link.eval_id)
    except NotFound:
        jobs.record_event(job, f"Eval '{link.eval_id}' was deleted; it was not run on the tuned model.",
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
            record = _run(link.eval_id, view["id"])
            unsent = unsent or (record is not None and record.status == "queued" and not record.enqueued_at)
        except ApiError as err:
            problems.append(f"{role} model {model}: {err.message}")
    link.update(actions=[JobEvalLink.run_ids.set(run_ids), JobEvalLink.enqueued.set(not unsent)])
    if unsent:
        raise ServiceUnavailable("The eval worker's queue could not be reached; the job's eval runs wait.")
    message = f"Eval '{link.eval_id}' started on " + ", ".join(f"{role} ({rid})" for rid, role in run_ids.items())
    if problems:
        message += ". Not run: " + "; ".join(problems)
    jobs.record_event(job, message + ".", source="rft-hub", data={"eval_id": link.eval_id, "runs": run_ids})


def report_job(team_id: str, job_id: str) -> None:
    """When every run a job started has finished: the comparison (base vs tuned, and each checkpoint),
    once, as a job event and an outbound event."""
    from chalicelib.services import jobs

    try:
        link = JobEvalLink.get(team_id, job_id, consistent_read=True)
    except DoesNotExist:
        return
    if link.reported or not link.run_ids:
        return
    runs = {rid: _run(link.eval_id, rid) for rid in link.run_ids}
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
            tx.update(link, actions=[JobEvalLink.reported.set(True)], condition=JobEvalLink.reported == False)  # noqa: E712
            tx.save(event)
    except TransactWriteError as exc:
        if dynamo.is_condition(exc):
            return                  # reported by a concurrent finish
        raise
    outbox.publish([event])
    try:
        job = Job.get(team_id, job_id, consistent_read=True)
        jobs.record_event(job, f"Eval '{link.eval_id}' comparison: " + " | ".join(lines), source="rft-hub",
                          data=comparison)
    except DoesNotExist:
        pass
