"""The ledger (one entry per metered call, the record of truth), daily totals derived from
it, repair of holds a crash left open, and usage reports. Money in exact micro-dollars.

Per served call, on the request path, no transaction and no team-wide item but the budget:
  1. the ledger entry: one conditional PutItem keyed by the request (a retry is a no-op);
  2. the budget settlement: one UpdateItem on the team's period item (spend/budgets.py).
If the ledger write still fails after retries, the entry goes to a dead-letter queue that
the reconciler drains into the ledger; the hold stays open until then, so the budget never
forgets the money. Daily totals are added up later by `aggregate` (sparse index of entries
not yet counted, drained in transactions that mark each entry counted), so they equal the
ledger exactly and no per-call write touches a shared counter.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from pynamodb.exceptions import PynamoDBException, TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib import deadline
from chalicelib.adapters import aws, queues
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import pricing
from chalicelib.errors import ApiError, InvalidRequest
from chalicelib.log import logger
from chalicelib.spend import budgets
from chalicelib.store import dynamo
from chalicelib.store.models import Budget, Job, LedgerEntry, Team, UsageDaily, connection

GROUPS = ("day", "model", "key", "kind")
_COUNTERS = ("requests", "errors", "input_tokens", "cached_tokens", "output_tokens", "cost_micro")
REPORT_AGGREGATE_BATCHES = 10  # a usage report counts at most this many batches itself
AGGREGATE_BATCH = 40          # ledger entries per transaction (+ at most as many daily buckets <= 100 items)
_ENTRY_FIELDS = ("team_id", "sort_key", "request_id", "key_id", "model", "upstream_model", "alias", "endpoint",
                 "input_tokens", "cached_tokens", "output_tokens", "cost_micro", "reserved_micro", "latency_ms",
                 "status", "stream", "created_at", "kind", "outcome", "hold_id", "job_id")


def retention_days() -> int:
    return int(os.environ.get("RFT_LEDGER_RETENTION_DAYS", "90"))


def ledger_dlq() -> str:
    return os.environ.get("RFT_LEDGER_DLQ", f"rfthub-{os.environ.get('RFT_STAGE', 'local')}-ledger-dlq")


def sort_key(created_ms: int, request_id: str) -> str:
    return f"{created_ms:013d}#{request_id}"


# ---- writing -----------------------------------------------------------------------------------

def _put(entry: LedgerEntry) -> None:
    """Idempotent: the entry is written once; a repeat finds it there and is a success."""
    entry.expires_at = timedelta(days=retention_days())
    entry.agg_team = entry.team_id
    dynamo.put_once(entry, LedgerEntry.sort_key, "ledger write")


def _entry_json(entry: LedgerEntry) -> str:
    return json.dumps({f: getattr(entry, f) for f in _ENTRY_FIELDS}, separators=(",", ":"))


def record(res: budgets.Reservation, entry: LedgerEntry, *, settle: bool = True) -> bool:
    """Writes the call to the ledger, then (unless `settle` is False: the caller settles after
    answering, with `settle_call`) settles its hold at the call's cost. Never loses a served
    call: a ledger that stays unwritable sends the entry to the dead-letter queue (the
    reconciler writes it later and settles); a settlement that fails leaves the hold for the
    reconciler, which settles it from the ledger. Returns whether the entry is on the ledger
    (False: dead-lettered, and then its hold is the reconciler's to settle)."""
    entry.hold_id = res.hold_id
    try:
        _put(entry)
    except (ApiError, PynamoDBException) as exc:
        _dead_letter(entry, exc)
        return False
    if settle:
        settle_call(res, entry)
    return True


def settle_call(res: budgets.Reservation, entry: LedgerEntry) -> None:
    """Settles a call's hold at its ledger cost; never raises (the ledger entry lets the
    reconciler settle an expired hold the same way)."""
    try:
        budgets.settle(res, entry.cost_micro)
    except (ApiError, PynamoDBException):
        logger.warning("settlement deferred to the reconciler", extra={"hold_id": res.hold_id,
                                                                       "team_id": res.team_id})


def _dead_letter(entry: LedgerEntry, exc: Exception) -> None:
    body = _entry_json(entry)
    try:
        queues.send(ledger_dlq(), body)
        logger.warning("ledger write failed; entry dead-lettered", extra={"request_id": entry.request_id,
                                                                           "error": type(exc).__name__})
    except Exception:  # noqa: BLE001 - the last resort: the whole entry in the logs, for replay
        logger.error("ledger write and dead-letter both failed", extra={"ledger_entry": body})


def ledger_parked_queue() -> str:
    """FIFO, so a repeated park of the same entry (a DLQ delete that failed after parking, a
    standard queue's second delivery) is dropped by SQS's deduplication id."""
    return os.environ.get("RFT_LEDGER_PARKED",
                          f"rfthub-{os.environ.get('RFT_STAGE', 'local')}-ledger-parked.fifo")


# DynamoDB refuses these for the item itself (a number of more than 38 digits, a bad type):
# the same entry is refused on every attempt, so it is parked, never retried.
_PERMANENT_CODES = {"ValidationException", "SerializationException"}


class _Unwritable(Exception):
    """A dead-lettered message that can never become a ledger entry."""


def _entry_from(body: str) -> LedgerEntry:
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        return LedgerEntry(data.pop("team_id"), data.pop("sort_key"), **data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:   # json's errors are ValueErrors
        raise _Unwritable(f"unreadable entry: {type(exc).__name__}") from exc


def _replay(body: str) -> None:
    """Writes one dead-lettered entry (idempotent: keyed by its request). Raises _Unwritable when
    it never can be; any other exception is transient (the message waits for the next pass)."""
    entry = _entry_from(body)
    try:
        _put(entry)
    except PynamoDBException as exc:
        if dynamo.response_code(exc) in _PERMANENT_CODES:
            raise _Unwritable(f"DynamoDB refused the entry: {dynamo.response_code(exc)}") from exc
        raise
    except (ValueError, TypeError) as exc:    # refused before sending (serialization): the same every time
        raise _Unwritable(f"unserializable entry: {type(exc).__name__}") from exc
    try:
        _settle_from_ledger(entry)
    except (ApiError, PynamoDBException):
        # On the ledger now: release_expired_holds settles the hold from it when it expires.
        logger.warning("dead-letter replay: settlement deferred", extra={"hold_id": entry.hold_id})


def _park(body: str, reason: str) -> None:
    """Into the parked queue (its depth alarms an operator), deduplicated by the body's hash so
    a park that is repeated (the DLQ delete failed, a second delivery or copy of the same
    entry) leaves one copy. SQS deduplicates for 5 minutes; a later repeat is a second copy
    of the same entry, whose replay is idempotent (keyed by its request)."""
    queues.send(ledger_parked_queue(), body, MessageGroupId="ledger",
                MessageDeduplicationId=hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest(),
                MessageAttributes={"reason": {"DataType": "String", "StringValue": reason[:256]}})


def drain_dead_letters(max_messages: int = 500) -> dict:
    """Writes dead-lettered entries into the ledger and settles their holds (reconciler), each
    message on its own: written -> deleted; a transient failure -> left for the next pass (only
    that message; it is invisible until then, so this pass goes on with the rest); never
    writable (a validation error, an unreadable body) -> parked in the parked queue and deleted.
    A served call is always on the ledger or in one of the two queues."""
    sqs = aws.sqs()
    url = queues.url(ledger_dlq())
    report = {"written": 0, "parked": 0, "left": 0}
    seen = 0
    while seen < max_messages and deadline.remaining() > 2.0:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not messages:
            break
        for message in messages:
            seen += 1
            body = message.get("Body", "")
            try:
                try:
                    _replay(body)
                    outcome = "written"
                except _Unwritable as exc:
                    _park(body, str(exc))
                    logger.error("ledger entry parked: it can never be written", extra={
                        "message_id": message["MessageId"], "reason": str(exc), "queue": ledger_parked_queue()})
                    outcome = "parked"
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            except Exception as exc:  # noqa: BLE001 - transient (a park too): this one waits, the rest go on
                # A failed delete after a write or a park is harmless: both repeat idempotently.
                logger.warning("dead-letter replay failed; retried next pass", extra={
                    "message_id": message["MessageId"], "error": type(exc).__name__})
                report["left"] += 1
                continue
            report[outcome] += 1
    return report


def _settle_from_ledger(entry: LedgerEntry) -> None:
    if not entry.hold_id:
        return
    period = budget_rules.period_of(entry.created_at)
    holds = budgets.open_holds(budgets.period_item(entry.team_id, period))
    if entry.hold_id in holds:
        budgets.settle(budgets.Reservation(entry.team_id, period, holds[entry.hold_id], entry.hold_id),
                       entry.cost_micro)


# ---- repair of holds left open -----------------------------------------------------------------

def _ledger_for_hold(team_id: str, hold_id: str) -> LedgerEntry | None:
    created = budgets.hold_created_ms(hold_id)
    prefix = f"{created:013d}#" if created is not None else ""
    for entry in LedgerEntry.query(team_id, LedgerEntry.sort_key.startswith(prefix),
                                   filter_condition=LedgerEntry.hold_id == hold_id, consistent_read=True):
        return entry
    return None


def release_expired_holds(now: float | None = None, team_ids: list[str] | None = None) -> dict:
    """Holds of calls that never settled (the function died between reserve and settle, or a
    settlement failed): settled at the ledger's cost when the call is on the ledger, else
    released and recorded on the ledger as `abandoned`. Job holds are the jobs' to settle."""
    now = now or time.time()
    periods = {budget_rules.period_of(now), budget_rules.period_of(now - 32 * 86400)}
    report = {"settled": 0, "abandoned": 0, "orphaned_job_holds": 0}
    configs = [c for c in (budgets.config(t) for t in team_ids) if c] if team_ids is not None else Budget.scan()
    for cfg in configs:
        for period in periods:
            item = budgets.period_item(cfg.team_id, period)
            for hold_id, micro in budgets.open_holds(item).items():
                if not budgets.hold_expired(hold_id, now):
                    continue
                try:
                    _repair_hold(report, budgets.Reservation(cfg.team_id, period, micro, hold_id))
                except (ApiError, PynamoDBException) as exc:
                    # One hold that cannot be repaired now never stops the others (next pass retries it).
                    report["failed"] = report.get("failed", 0) + 1
                    logger.warning("expired hold not repaired", extra={"team_id": cfg.team_id, "hold_id": hold_id,
                                                                       "error": type(exc).__name__})
    return report


def _repair_hold(report: dict, res: budgets.Reservation) -> None:
    team_id, hold_id, micro = res.team_id, res.hold_id, res.micro
    if budgets.hold_job_id(hold_id):
        report["orphaned_job_holds"] += int(_release_orphan_job_hold(res))
        return
    entry = _ledger_for_hold(team_id, hold_id)
    if entry is None:
        created = budgets.hold_created_ms(hold_id) or 0
        entry = LedgerEntry(team_id, sort_key(created, f"abandoned-{hold_id}"),
                            request_id=f"abandoned-{hold_id}", model="-", upstream_model="-",
                            endpoint="-", status=0, created_at=created // 1000, kind="abandoned",
                            outcome="abandoned", reserved_micro=micro, hold_id=hold_id)
        _put(entry)
        kind = "abandoned"
    else:
        kind = "settled"
    if budgets.settle(res, entry.cost_micro):
        report[kind] += 1
        logger.warning("expired hold repaired", extra={"team_id": team_id, "hold_id": hold_id, "outcome": kind})


def _release_orphan_job_hold(res: budgets.Reservation) -> bool:
    """A job hold whose job was never recorded with it (the create died after reserving)."""
    try:
        job = Job.get(res.team_id, budgets.hold_job_id(res.hold_id), consistent_read=True)
        if job.budget_hold_id == res.hold_id:
            return False          # the job's own hold: the job settles it when it ends
    except Job.DoesNotExist:
        pass
    return budgets.settle(res, 0)


# ---- daily totals ------------------------------------------------------------------------------

def _bucket(entry: LedgerEntry) -> tuple[str, str, str, str]:
    day = datetime.fromtimestamp(entry.created_at, UTC).strftime("%Y-%m-%d")
    return day, entry.model, entry.key_id or "-", entry.kind or "inference"


def aggregate_team(team_id: str, max_batches: int | None = None) -> int:
    """Adds the team's not-yet-counted ledger entries to the daily totals, exactly once: each
    transaction marks its entries counted (conditionally) and adds them to their buckets."""
    counted, lost_races, batches = 0, 0, 0
    while deadline.remaining() > 1.0 and lost_races < 5 and (max_batches is None or batches < max_batches):
        batches += 1
        pending = list(LedgerEntry.pending_usage.query(team_id, limit=AGGREGATE_BATCH))
        if not pending:
            break
        sums: dict[tuple, dict] = defaultdict(lambda: dict.fromkeys(_COUNTERS, 0))
        for entry in pending:
            totals = sums[_bucket(entry)]
            totals["requests"] += 1
            totals["errors"] += 0 if entry.outcome == "served" and entry.status < 400 else 1
            for name in ("input_tokens", "cached_tokens", "output_tokens", "cost_micro"):
                totals[name] += int(getattr(entry, name) or 0)
        try:
            with TransactWrite(connection=connection()) as tx:
                for entry in pending:
                    tx.update(LedgerEntry(team_id, entry.sort_key), actions=[LedgerEntry.agg_team.remove()],
                              condition=LedgerEntry.agg_team.exists())
                for (day, model, key_id, kind), totals in sums.items():
                    tx.update(UsageDaily(team_id, f"{day}#{model}#{key_id}#{kind}"), actions=[
                        UsageDaily.day.set(day), UsageDaily.model.set(model), UsageDaily.key_id.set(key_id),
                        UsageDaily.kind.set(kind),
                        *(getattr(UsageDaily, name).add(value) for name, value in totals.items())])
        except TransactWriteError as exc:
            if dynamo.classify(exc) in (dynamo.CONDITION, dynamo.BUSY):
                lost_races += 1    # another aggregator counted some of them (or the index lags): re-read
                time.sleep(0.05 * lost_races)
                continue
            raise
        counted += len(pending)
    return counted


def aggregate_all() -> int:
    counted = 0
    for team in Team.scan():
        try:
            counted += aggregate_team(team.team_id)
        except (ApiError, PynamoDBException) as exc:   # one team's failure never stops the others
            logger.warning("usage not aggregated", extra={"team_id": team.team_id, "error": type(exc).__name__})
    return counted


# ---- reading -----------------------------------------------------------------------------------

def _day(value: str | None, default: datetime, param: str) -> str:
    if not value:
        return default.strftime("%Y-%m-%d")
    try:
        return datetime.strptime(value, "%Y-%m-%d").strftime("%Y-%m-%d")
    except ValueError:
        raise InvalidRequest(f"{param} must be a date like 2026-11-01.", param=param) from None


def report(team_ids: list[str], start: str | None, end: str | None, group_by: str) -> dict:
    if group_by not in GROUPS:
        raise InvalidRequest(f"group_by must be one of {', '.join(GROUPS)}.", param="group_by")
    today = datetime.now(UTC)
    start_day = _day(start, today.replace(day=1), "start")
    end_day = _day(end, today, "end")
    if start_day > end_day:
        raise InvalidRequest("start is after end.", param="start")
    groups: dict[tuple, dict] = defaultdict(lambda: dict.fromkeys(_COUNTERS, 0))
    kinds: dict[str, int] = defaultdict(int)
    for team_id in team_ids:
        try:
            # Fresh totals: count what the aggregator has not yet (bounded; the schedule does the rest).
            aggregate_team(team_id, max_batches=REPORT_AGGREGATE_BATCHES)
        except ApiError:
            pass                          # busy: the report shows what was counted so far
        for row in UsageDaily.query(team_id, UsageDaily.bucket.between(f"{start_day}#", f"{end_day}#\uffff")):
            key = {"day": row.day, "model": row.model, "key": row.key_id, "kind": row.kind or "inference"}[group_by]
            bucket = groups[(team_id, key)]
            for counter in _COUNTERS:
                bucket[counter] += int(getattr(row, counter) or 0)
            kinds[row.kind or "inference"] += int(row.cost_micro or 0)
    # Grader (LLM judge) spend beside inference; training holds are listed under "training".
    by_kind = {kind: pricing.usd(kinds.get(kind, 0)) for kind in ("inference", "grader", *sorted(set(kinds) - {
        "inference", "grader"}))}
    data = [{"team_id": team, group_by if group_by != "key" else "key_id": key, **values,
             "cost_usd": pricing.usd(values["cost_micro"])} for (team, key), values in sorted(groups.items())]
    totals = {c: sum(d[c] for d in data) for c in _COUNTERS}
    totals["cost_usd"] = pricing.usd(totals["cost_micro"])
    return {"object": "usage", "spend_by_kind": by_kind, "start": start_day, "end": end_day, "group_by": group_by,
            "data": data,
            "totals": totals, "training": _training(team_ids, start_day, end_day)}


def _training(team_ids: list[str], start_day: str, end_day: str) -> list[dict]:
    lo = int(datetime.strptime(start_day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    hi = int((datetime.strptime(end_day, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)).timestamp())
    out = []
    for team_id in team_ids:
        for job in Job.query(team_id, filter_condition=Job.created_at.between(lo, hi - 1)):
            est = (job.estimate or {}).get("estimated_micro_usd")
            settled = est if job.status == "succeeded" else (0 if job.status in ("failed", "cancelled") else None)
            judge = (job.estimate or {}).get("judge") or {}
            out.append({"team_id": team_id, "job_id": job.job_id, "model": job.model, "status": job.status,
                        "estimated_usd": pricing.usd(est) if est is not None else None,
                        "settled_usd": pricing.usd(settled) if settled is not None else None,
                        "judge_estimated_usd": judge.get("estimated_usd"),
                        "judge_spent_usd": pricing.usd(int(job.judge_micro or 0))})
    return out


def to_csv(usage: dict) -> str:
    out = io.StringIO()
    key = {"day": "day", "model": "model", "key": "key_id", "kind": "kind"}[usage["group_by"]]
    writer = csv.writer(out)
    writer.writerow(["team_id", key, *_COUNTERS, "cost_usd"])
    for row in usage["data"]:
        writer.writerow([row["team_id"], row[key], *(row[c] for c in _COUNTERS), row["cost_usd"]])
    return out.getvalue()


def all_team_ids() -> list[str]:
    return [t.team_id for t in Team.scan()]
