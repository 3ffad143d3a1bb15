"""Per-call ledger, daily totals and usage reports (exact micro-dollars)."""
from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from datetime import datetime, timedelta, timezone

from pynamodb.transactions import TransactWrite

from chalicelib.domain import pricing
from chalicelib.errors import InvalidRequest
from chalicelib.services import budgets
from chalicelib.store.models import Job, LedgerEntry, Team, UsageDaily, connection

GROUPS = ("day", "model", "key")
_COUNTERS = ("requests", "errors", "input_tokens", "cached_tokens", "output_tokens", "cost_micro")


def retention_days() -> int:
    return int(os.environ.get("RFT_LEDGER_RETENTION_DAYS", "90"))


def record(res: budgets.Reservation, entry: LedgerEntry) -> None:
    """One transaction (one round trip): the ledger entry, the daily totals, the budget settlement."""
    day = datetime.fromtimestamp(entry.created_at, timezone.utc).strftime("%Y-%m-%d")
    key_id = entry.key_id or "-"
    daily = UsageDaily(entry.team_id, f"{day}#{entry.model}#{key_id}")
    entry.expires_at = timedelta(days=retention_days())
    with TransactWrite(connection=connection()) as tx:
        tx.save(entry)
        tx.update(daily, actions=[
            UsageDaily.day.set(day), UsageDaily.model.set(entry.model), UsageDaily.key_id.set(key_id),
            UsageDaily.requests.add(1), UsageDaily.errors.add(0 if entry.status < 400 else 1),
            UsageDaily.input_tokens.add(entry.input_tokens), UsageDaily.cached_tokens.add(entry.cached_tokens),
            UsageDaily.output_tokens.add(entry.output_tokens), UsageDaily.cost_micro.add(entry.cost_micro)])
        budgets.settle_in(tx, res, entry.cost_micro)
    if entry.cost_micro:
        budgets.announce_thresholds(res, entry.cost_micro)


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
    today = datetime.now(timezone.utc)
    start_day = _day(start, today.replace(day=1), "start")
    end_day = _day(end, today, "end")
    if start_day > end_day:
        raise InvalidRequest("start is after end.", param="start")
    groups: dict[tuple, dict] = defaultdict(lambda: dict.fromkeys(_COUNTERS, 0))
    for team_id in team_ids:
        for row in UsageDaily.query(team_id, UsageDaily.bucket.between(f"{start_day}#", f"{end_day}#\uffff")):
            key = {"day": row.day, "model": row.model, "key": row.key_id}[group_by]
            bucket = groups[(team_id, key)]
            for counter in _COUNTERS:
                bucket[counter] += int(getattr(row, counter) or 0)
    data = [{"team_id": team, group_by if group_by != "key" else "key_id": key, **values,
             "cost_usd": pricing.usd(values["cost_micro"])} for (team, key), values in sorted(groups.items())]
    totals = {c: sum(d[c] for d in data) for c in _COUNTERS}
    totals["cost_usd"] = pricing.usd(totals["cost_micro"])
    return {"object": "usage", "start": start_day, "end": end_day, "group_by": group_by, "data": data,
            "totals": totals, "training": _training(team_ids, start_day, end_day)}


def _training(team_ids: list[str], start_day: str, end_day: str) -> list[dict]:
    lo = int(datetime.strptime(start_day, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp())
    hi = int((datetime.strptime(end_day, "%Y-%m-%d").replace(tzinfo=timezone.utc) + timedelta(days=1)).timestamp())
    out = []
    for team_id in team_ids:
        for job in Job.query(team_id, filter_condition=Job.created_at.between(lo, hi - 1)):
            est = (job.estimate or {}).get("estimated_micro_usd")
            settled = est if job.status == "succeeded" else (0 if job.status in ("failed", "cancelled") else None)
            out.append({"team_id": team_id, "job_id": job.job_id, "model": job.model, "status": job.status,
                        "estimated_usd": pricing.usd(est) if est is not None else None,
                        "settled_usd": pricing.usd(settled) if settled is not None else None})
    return out


def to_csv(usage: dict) -> str:
    out = io.StringIO()
    key = {"day": "day", "model": "model", "key": "key_id"}[usage["group_by"]]
    writer = csv.writer(out)
    writer.writerow(["team_id", key, *_COUNTERS, "cost_usd"])
    for row in usage["data"]:
        writer.writerow([row["team_id"], row[key], *(row[c] for c in _COUNTERS), row["cost_usd"]])
    return out.getvalue()


def all_team_ids() -> list[str]:
    return [t.team_id for t in Team.scan()]
