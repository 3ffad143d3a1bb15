"""What the ledger (spend/ledger.py) is used for: repair of money set aside and never given
back, daily totals derived from the ledger, and usage reports. Money in exact micro-dollars.

Daily totals are added up later by `aggregate` (a sparse index of entries not yet counted,
drained in transactions that mark each entry counted), so they equal the ledger exactly and no
per-call write touches a shared counter.
"""
from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from pynamodb.exceptions import PynamoDBException, TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib import deadline
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import pricing
from chalicelib.errors import ApiError, InvalidRequest
from chalicelib.log import logger
from chalicelib.spend import budgets, ledger, shards
from chalicelib.store import dynamo
from chalicelib.store.models import Budget, Job, LedgerEntry, Team, UsageDaily, connection

GROUPS = ("day", "model", "key", "kind")
_COUNTERS = ("requests", "errors", "input_tokens", "cached_tokens", "output_tokens", "cost_micro")
REPORT_AGGREGATE_BATCHES = 10  # a usage report counts at most this many batches itself
AGGREGATE_BATCH = 40          # ledger entries per transaction (+ at most as many daily buckets <= 100 items)


def drain_dead_letters(max_messages: int = 500) -> dict:
    """Dead-lettered ledger entries into the ledger (reconciler); a per-call hold of an entry
    written so is settled from it. Slices are not: their owner, or `close_expired`, settles them."""
    return ledger.drain_dead_letters(max_messages, on_written=_settle_call_hold)


def _settle_call_hold(entry: LedgerEntry) -> None:
    if not entry.hold_id or budgets.is_slice(entry.hold_id) or budgets.hold_job_id(entry.hold_id):
        return
    period = budget_rules.period_of(entry.created_at)
    holds = budgets.open_holds(budgets.period_item(entry.team_id, period))
    if entry.hold_id in holds:
        budgets.settle(budgets.Reservation(entry.team_id, period, holds[entry.hold_id], entry.hold_id),
                       entry.cost_micro)


# ---- repair of holds left open -----------------------------------------------------------------

def release_expired_holds(now: float | None = None, team_ids: list[str] | None = None) -> dict:
    """Money set aside and never given back, once every call admitted against it has surely
    ended: a slice is settled at what the ledger holds for it (`close_expired`); a per-call hold
    (older versions) at its ledger entry's cost, or released and recorded as `abandoned`; a job's
    hold only when no job was recorded with it (the job settles its own)."""
    now = now or time.time()
    periods = {budget_rules.period_of(now), budget_rules.period_of(now - 32 * 86400)}
    report = {"settled": 0, "abandoned": 0, "orphaned_job_holds": 0, "slices_closed": 0}
    configs = [c for c in (budgets.config(t) for t in team_ids) if c] if team_ids is not None else Budget.scan()
    dlq_checked: list[bool] = []
    for cfg in configs:
        for period in periods:
            for pk, item in shards.owners(cfg.team_id, period):      # the root, then each granted shard
                for hold_id, micro in budgets.open_holds(item).items():
                    if not budgets.hold_expired(hold_id, now):
                        continue
                    try:
                        res = budgets.Reservation(cfg.team_id, period, micro, hold_id, pk=pk)
                        if budgets.is_slice(hold_id):
                            report["slices_closed"] += int(_close_slice(res, dlq_checked))
                        else:
                            _repair_hold(report, res)
                    except (ApiError, PynamoDBException) as exc:
                        # One hold that cannot be repaired now never stops the others (next pass retries it).
                        report["failed"] = report.get("failed", 0) + 1
                        logger.warning("expired hold not repaired", extra={
                            "team_id": cfg.team_id, "hold_id": hold_id, "error": type(exc).__name__})
            try:
                # Shards with no slice left: their room and spend back in the root, nothing held there.
                folded = shards.fold_idle(cfg.team_id, period)
                if folded:
                    report["shards_folded"] = report.get("shards_folded", 0) + folded
            except (ApiError, PynamoDBException) as exc:
                report["failed"] = report.get("failed", 0) + 1
                logger.warning("budget shards not folded", extra={"team_id": cfg.team_id,
                                                                  "error": type(exc).__name__})
    return report


def close_expired(team_id: str, period: str, now: float | None = None) -> int:
    """Closes the team's slices whose calls have surely all ended (an instance that froze or died
    with them): each settled at what the ledger holds for it. Returns how many were closed."""
    now = now or time.time()
    dlq_checked: list[bool] = []
    closed = 0
    for pk, item in shards.owners(team_id, period):
        for hold_id, micro in budgets.open_holds(item).items():
            if budgets.is_slice(hold_id) and budgets.hold_expired(hold_id, now):
                closed += int(_close_slice(budgets.Reservation(team_id, period, micro, hold_id, pk=pk), dlq_checked))
    return closed


def _close_slice(res: budgets.Reservation, dlq_checked: list[bool]) -> bool:
    """Settles a slice at the sum of its ledger entries -- only while no dead-lettered entry is
    waiting (it may be one of this slice's calls: the slice's money waits for the next pass)."""
    if not dlq_checked:
        dlq_checked.append(ledger.dlq_empty())
    if not dlq_checked[0]:
        return False
    used = sum(int(e.cost_micro or 0) for e in ledger.entries_for_hold(res.team_id, res.hold_id))
    closed = budgets.settle(res, used)
    if closed:
        logger.warning("slice closed from the ledger", extra={"team_id": res.team_id, "hold_id": res.hold_id,
                                                              "set_aside": res.micro, "used": used})
    return closed


def _repair_hold(report: dict, res: budgets.Reservation) -> None:
    team_id, hold_id, micro = res.team_id, res.hold_id, res.micro
    if budgets.hold_job_id(hold_id):
        report["orphaned_job_holds"] += int(_release_orphan_job_hold(res))
        return
    found = ledger.entries_for_hold(team_id, hold_id)
    if found:
        entry, kind = found[0], "settled"
    else:
        created = budgets.hold_created_ms(hold_id) or 0
        entry = ledger.new_entry(team_id, created, f"abandoned-{hold_id}", hold_id, model="-", upstream_model="-",
                                 endpoint="-", status=0, kind="abandoned", outcome="abandoned", reserved_micro=micro)
        ledger.put(entry)
        kind = "abandoned"
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
    """Adds the team's not-yet-counted ledger entries to the daily totals, exactly once, shard by
    shard: each transaction marks its entries counted (conditionally) and adds them to their buckets."""
    counted = 0
    for pk in ledger.partitions(team_id):
        counted += _aggregate_shard(team_id, pk, max_batches)
    return counted


def _aggregate_shard(team_id: str, pk: str, max_batches: int | None) -> int:
    counted, lost_races, batches = 0, 0, 0
    while deadline.remaining() > 1.0 and lost_races < 5 and (max_batches is None or batches < max_batches):
        batches += 1
        pending = list(LedgerEntry.pending_usage.query(pk, limit=AGGREGATE_BATCH))
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
                    tx.update(LedgerEntry(pk, entry.sort_key), actions=[LedgerEntry.agg_team.remove()],
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
