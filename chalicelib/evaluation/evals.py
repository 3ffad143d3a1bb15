"""Evals as a service (OpenAI's Evals API): evals, runs on base, tuned and checkpoint models (or
on given outputs), per-item results, comparisons, promotion gates on aliases, and the eval a
fine-tuning job names (`rft_eval`).

This is the control plane: a run is recorded here and queued (`enqueue`); the eval worker
(evaluation/worker.py, an SQS-triggered function) runs it, resumably, with every model call
metered. A queued run not picked up in time is queued again when it is read (`_repair`).
"""
from __future__ import annotations

import hashlib
import json
import secrets

from pynamodb.exceptions import DeleteError, DoesNotExist, PutError, UpdateError

from chalicelib.adapters import queues
from chalicelib.config import evals_queue
from chalicelib.domain import evals as rules
from chalicelib.domain import ids, numbers, pricing
from chalicelib.domain.datasets import iter_lines, parse_json
from chalicelib.errors import ApiError, Conflict, InvalidRequest, NotFound
from chalicelib.grading import graders
from chalicelib.inference import targets
from chalicelib.log import logger
from chalicelib.platform import files
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import EvalDefinition, EvalOutputItem, EvalRunRecord

REQUEUE_AFTER_S = 120           # a queued run not picked up this long is queued again when read
NO_ERROR = {"code": "", "message": ""}   # OpenAI's document requires the error object; empty = none
RUN_PREFIX = "evalrun_"
ITEM_PREFIX = "outputitem_"


def _invalid(exc: rules.EvalRuleError, prefix: str = "") -> InvalidRequest:
    param = exc.param
    if prefix and param:
        param = f"{prefix}.{param}"
    return InvalidRequest(exc.message, param=param)


def apply_rules(fn, *args, prefix: str = ""):
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


def _list(data: list[dict], page: pagination.Page | None = None) -> dict:
    # OpenAI's list objects require first_id and last_id as strings: "" on an empty page.
    return pagination.envelope(data, page, first_last="")


def _order(order: str | None) -> bool:
    """newest_first for OpenAI's `order` (asc by default on the Evals API)."""
    if order in (None, "", "asc"):
        return False
    if order == "desc":
        return True
    raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")


# ---- evals ----------------------------------------------------------------------------------------

def compile_criteria(team_id: str, criteria: list[rules.Criterion], allowed=None) -> list:
    """`allowed`: the calling key's model list (None: any), for the judges the criteria name."""
    return [graders.compile_spec(c.spec, f"testing_criteria[{i}]", team_id, allowed) for i, c in enumerate(criteria)]


def create_eval(team_id: str, body: rules.CreateEval, allowed=None) -> dict:
    apply_rules(rules.check_metadata, body.metadata)
    cfg = apply_rules(rules.check_data_source_config, body.data_source_config)
    criteria = apply_rules(rules.check_criteria, body.testing_criteria)
    compile_criteria(team_id, criteria, allowed)
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
    apply_rules(rules.check_metadata, body.metadata)
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
        return _list([])
    page = pagination.query(EvalDefinition, team_id, index="by_created", limit=limit, start=start,
                            newest_first=newest_first, what="eval list")
    return _list([eval_view(e) for e in page.items], page)


def _delete_then_purge(record, key_attribute, what: str, purge: dict, unqueued: str, extra: dict) -> None:
    """Deletes `record` (idempotent: already gone is fine), then queues the purge of what hangs off
    it, off the request path; a purge not queued leaves that unreachable, never visible."""
    try:
        dynamo.call(lambda: record.delete(condition=key_attribute.exists()), idempotent=True, what=what)
    except DeleteError as exc:
        if not dynamo.is_condition(exc):
            raise
    if not _send(purge):
        logger.warning(unqueued, extra=extra)


def delete_eval(team_id: str, eval_id: str) -> dict:
    # Its runs (a running one stops at its next item: the run is gone) and their items.
    _delete_then_purge(get_eval(team_id, eval_id), EvalDefinition.eval_id, "eval delete",
                       {"purge_eval": eval_id, "team_id": team_id},
                       "eval purge not queued; its runs stay unreachable until purged", {"eval_id": eval_id})
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# ---- runs ---------------------------------------------------------------------------------------

def source_rows(team_id: str, ds: rules.DataSource,
                param: str = "data_source.source") -> list[tuple[int, dict, dict | None]]:
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


def check_rows(ev: EvalDefinition, ds: rules.DataSource, rows: list) -> None:
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
               role: str | None = None, run_id: str | None = None, allowed=None) -> tuple[int, dict]:
    """`allowed`: the models the calling key may call (issue #29; None: any)."""
    ev = get_eval(team_id, eval_id)
    apply_rules(rules.check_metadata, body.metadata)
    ds = apply_rules(rules.check_data_source, body.data_source)
    cap = apply_rules(rules.cap_micro, body)
    criteria = apply_rules(rules.criteria_from_stored, ev.testing_criteria)
    compile_criteria(team_id, criteria, allowed)  # judges still callable (by this key), Lambda graders registered
    rows = source_rows(team_id, ds)
    check_rows(ev, ds, rows)
    upstream = base = alias = None
    if ds.type == "completions":

        try:
            target, _ = targets.priced(team_id, ds.model, "data_source.model", allowed=allowed)
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
        record = run_record(eval_id, record.run_id)       # a job's run, created by an earlier finalize
    if record.status == "queued":
        enqueue(record)
    return 201, run_view(record)


def run_record(eval_id: str, run_id: str) -> EvalRunRecord | None:
    if not isinstance(run_id, str) or not run_id.startswith(RUN_PREFIX) or len(run_id) > 64:
        return None
    return dynamo.get_or_none(EvalRunRecord, eval_id, run_id, consistent_read=True, what="eval run read")


def get_run(team_id: str, eval_id: str, run_id: str, param: str = "run_id") -> EvalRunRecord:
    get_eval(team_id, eval_id)
    record = run_record(eval_id, run_id)
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
    start = pagination.resume_at(after, EvalRunRecord, hash_value=eval_id, anchor=lambda rid: run_record(eval_id, rid))
    if start is pagination.NOWHERE:
        return _list([])
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
    _delete_then_purge(get_run(team_id, eval_id, run_id), EvalRunRecord.run_id, "eval run delete",
                       {"purge_run": run_id, "eval_id": eval_id, "team_id": team_id},
                       "run purge not queued; its items stay unreachable", {"run_id": run_id})
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
            return _list([])
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


def stored_items(run_id: str) -> list[EvalOutputItem]:
    return dynamo.call(lambda: list(EvalOutputItem.query(run_id, consistent_read=True)), idempotent=True,
                       what="eval output items")


# ---- comparison ---------------------------------------------------------------------------------

def _brief(r: EvalRunRecord) -> dict:
    s = r.summary or {}
    return {"id": r.run_id, "status": r.status, "model": r.model, "rft_upstream_model": r.upstream_model,
            "result_counts": s.get("result_counts"), "rft_cost_usd": pricing.usd(int(s.get("cost_micro") or 0))}


def _scores(run_id: str) -> dict[int, dict]:
    out = {}
    for item in stored_items(run_id):
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

def _send(body: dict, delay: int = 0) -> bool:
    try:
        queues.send(evals_queue(), json.dumps(body), delay=delay)
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
