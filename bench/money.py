"""Money under DynamoDB faults (issue #11): 200 simultaneous chat calls against a team budget with
AWS-style conflicts and 5% throttles on every table, then the repairs and the invariants (exit 1 if one
fails): spend within the limit, every served call on the ledger once, daily totals = ledger, no hold
left, `insufficient_quota` only when the budget was really short, other refusals 503. Also the warm
path (faults off vs on) and the budget item's size and per-team ceiling with 10/100/1000 holds open."""
from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from bench import common
from bench.common import ROOT, new_team, percentiles, start_stack

MODEL = "openai.gpt-oss-120b"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
MAX_TOKENS = 10
CALLS, COVERED, COVERED_AMPLE, LATENCY_N = 200, 50, 10_000, 200
FAULTS = {"conflicts": True, "rules": [{"operation": "*", "table": "*", "rate": 0.05, "error": "ThrottlingException"}]}
ITEM_WCU_PER_S = 1000          # on-demand: what one item (one partition key value) takes per second
PROBE: dict = {}


def admin(c, admin_key, method, path, body):
    r = getattr(c.http, method)(path, body=json.dumps(body), headers={"Authorization": f"Bearer {admin_key}",
                                                                      "Content-Type": "application/json"})
    assert r.status_code < 300, r.json_body


def install_probe() -> None:
    """Watches rft-hub's DynamoDB calls: errors, time spent, the highest `committed` admitted, and for a
    refused reservation the item as DynamoDB saw it (ReturnValuesOnConditionCheckFailure=ALL_OLD)."""
    from pynamodb.connection.base import Connection
    original = Connection._make_api_call

    def call(self, op, kw):
        reserve = op == "UpdateItem" and kw.get("TableName", "").endswith("budget_periods") and \
            "<=" in kw.get("ConditionExpression", "")
        kw = {**kw, "ReturnValuesOnConditionCheckFailure": "ALL_OLD"} if reserve else kw
        started = time.perf_counter()
        try:
            out = original(self, op, kw)
        except Exception as exc:
            response = getattr(exc.__cause__, "response", None) or {}
            code = response.get("Error", {}).get("Code") or type(exc.__cause__ or exc).__name__
            PROBE["errors"].append(f"{op} {code}")
            if reserve and code == "ConditionalCheckFailedException":
                hold = next(v for v in kw["ExpressionAttributeNames"].values() if "." in v)
                item = response.get("Item") or {}
                PROBE["refused"].append((int(item.get("committed", {}).get("N", -1)),
                                         hold in item.get("holds", {}).get("M", {}), bool(item)))
            raise
        finally:
            PROBE["ddb_ms"] += (time.perf_counter() - started) * 1000
        if reserve:
            PROBE["max_committed"] = max(PROBE["max_committed"], int(out["Attributes"]["committed"]["N"]))
        return out
    Connection._make_api_call = call
    clear_probe()


def clear_probe() -> None:
    PROBE.update(refused=[], max_committed=0, errors=[], ddb_ms=0.0)


def burst(client, n: int) -> list[str]:
    """n calls from n threads, released together by a barrier (the local API Gateway's backlog is 256)."""
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
            return "ok"
        except Exception as err:  # noqa: BLE001 - every outcome is counted
            return f"{getattr(err, 'status_code', type(err).__name__)} {getattr(err, 'code', '')}"
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def phase(stack, c, admin_key, covered: int, worst: int, seed: int) -> dict:
    import openai

    from chalicelib.domain import budget as budget_rules
    from chalicelib.domain import pricing
    from chalicelib.spend import budgets, metering
    from chalicelib.store.models import BudgetPeriod, LedgerEntry, UsageDaily

    team_id, key = new_team(admin_key, f"money-{covered}")
    limit = covered * worst
    admin(c, admin_key, "put", f"/v1/admin/teams/{team_id}/budget", {"limit_usd": pricing.usd(limit)})
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=120)
    clear_probe()
    stack.ddb_faults.configure(**FAULTS, seed=seed)      # pass-through until now
    started = time.perf_counter()
    outcomes, seconds = dict(sorted(Counter(burst(client, CALLS)).items())), time.perf_counter() - started
    faults, errors, refused = stack.ddb_faults.counters()["faults"], Counter(PROBE["errors"]), PROBE["refused"]
    stack.ddb_faults.reset()
    dead = metering.drain_dead_letters()
    repaired = metering.release_expired_holds(now=time.time() + budgets.HOLD_TTL_SECONDS + 60, team_ids=[team_id])
    metering.aggregate_team(team_id)
    item = BudgetPeriod.get(team_id, budget_rules.period_of(time.time()), consistent_read=True)
    entries, daily = list(LedgerEntry.query(team_id, consistent_read=True)), list(UsageDaily.query(team_id))
    served = [e for e in entries if e.outcome == "served"]
    quota = outcomes.get("429 insufficient_quota", 0)
    with_room = [r for r in refused if not r[1] and r[0] + worst <= limit]
    checks = {
        "spend_within_limit": item.spent <= limit and PROBE["max_committed"] <= limit,
        "served_on_ledger_once": len(served) == outcomes.get("ok", 0) == len({e.request_id for e in served}),
        "spend_equals_ledger": item.spent == sum(int(e.cost_micro) for e in entries),
        "daily_totals_equal_ledger": sum(int(d.cost_micro) for d in daily) == item.spent
        and sum(int(d.requests) for d in daily) == len(entries),
        "no_hold_left": not budgets.open_holds(item) and item.committed == item.spent,
        "refusals_are_quota_or_503": set(outcomes) <= {"ok", "429 insufficient_quota", "503 service_unavailable"},
        "each_quota_refusal_seen_by_dynamodb": all(r[2] for r in refused) and sum(not r[1] for r in refused) >= quota,
        "no_insufficient_quota_with_room": not with_room and (covered < CALLS or quota == 0),
    }
    return {"budget_covers_calls": covered, "limit_micro_usd": limit, "worst_case_per_call_micro_usd": worst,
            "calls": CALLS, "seconds": round(seconds, 2), "outcomes": outcomes, "faults_injected": faults,
            "errors_rft_hub_saw": errors, "repairs": {"dead_letters_replayed": dead, **repaired},
            "spent_micro_usd": int(item.spent), "max_committed_seen_micro_usd": PROBE["max_committed"],
            "ledger": {"served": len(served), "unique_request_ids": len({e.request_id for e in served}),
                       "other": len(entries) - len(served),
                       "served_reserved_micro_usd": sum(int(e.reserved_micro) for e in served),
                       "served_cost_micro_usd": sum(int(e.cost_micro) for e in served)},
            "reservations_refused": len(refused), "refused_hold_already_ours": sum(1 for r in refused if r[1]),
            "refused_with_room": len(with_room), "invariants_failed": [k for k, ok in checks.items() if not ok]}


def timed(fn, n: int = LATENCY_N) -> list[float]:
    return common.timed(fn, n)


def warm_path(stack, c, admin_key) -> dict:
    """The same sequential calls, faults off then on: latency added in-process, DynamoDB calls."""
    import openai
    from aws_bedrock_token_generator import provide_token

    team_id, key = new_team(admin_key, "money-warm")
    admin(c, admin_key, "put", f"/v1/admin/teams/{team_id}/budget", {"limit_usd": "1000000"})
    direct = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.bedrock.port}/v1",
                           api_key=provide_token(region="us-west-2"), max_retries=0)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS})
    statuses: list[int] = []

    def straight():
        direct.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)

    def through():
        statuses.append(c.http.post("/v1/chat/completions", headers=headers, body=body).status_code)
    result = {}
    for label, faults in (("faults_off", {}), ("conflicts_and_5pct_throttles", {**FAULTS, "seed": 3})):
        timed(straight, 20)
        timed(through, 20)                   # warm: connections and caches
        stack.ddb_faults.reset()             # counters from here on
        stack.ddb_faults.configure(**faults)
        base = percentiles(timed(straight))
        statuses.clear()
        clear_probe()
        ours = percentiles(timed(through))
        counters = stack.ddb_faults.counters()
        refused = sum(n for per_op in counters["faults"].values() for n in per_op.values())
        result[label] = {"direct_ms": base, "through_rft_hub_in_process_ms": ours,
                         "added_ms": {k: round(ours[k] - base[k], 2) for k in ("p50", "p95")},
                         "in_dynamodb_ms_per_call": round(PROBE["ddb_ms"] / LATENCY_N, 2),
                         "non_200": len([s for s in statuses if s != 200]), "forwarded": counters["forwarded"],
                         "dynamodb_forwarded_per_call": round(sum(counters["forwarded"].values()) / LATENCY_N, 2),
                         "dynamodb_refused_per_call": round(refused / LATENCY_N, 3)}
    stack.ddb_faults.reset()
    return result


def ddb_size(value: dict) -> int:
    """A value's size by DynamoDB's rules (Developer Guide, "Item sizes and formats")."""
    (kind, v), = value.items()
    if kind == "S":
        return len(v.encode())
    if kind == "N":
        return (len(v.lstrip("-").replace(".", "").strip("0") or "0") + 1) // 2 + 1
    if kind == "M":
        return 3 + sum(len(k.encode()) + ddb_size(x) + 1 for k, x in v.items())
    if kind == "L":
        return 3 + sum(ddb_size(x) + 1 for x in v)
    return 1  # BOOL, NULL


def hot_item(c, admin_key, worst: int) -> dict:
    """The team's budget item with 10/100/1000 holds open, and the ceiling it sets."""
    from chalicelib.domain import budget as budget_rules
    from chalicelib.spend import budgets
    from chalicelib.store.models import BudgetPeriod

    team_id, _ = new_team(admin_key, "money-scale")
    admin(c, admin_key, "put", f"/v1/admin/teams/{team_id}/budget", {"limit_usd": "1000000"})
    rows = []
    for before, in_flight in ((0, 10), (10, 100), (100, 1000)):
        for _ in range(in_flight - before):
            budgets.reserve(team_id, worst)
        raw = BudgetPeriod._get_connection().get_item(team_id, budget_rules.period_of(time.time()),
                                                      consistent_read=True)["Item"]
        size = sum(len(k.encode()) + ddb_size(v) for k, v in raw.items())
        wcu = 2 * math.ceil(size / 1024)     # reserve + settle, each billed on the larger image
        rows.append({"holds_open": in_flight, "item_bytes": size, "item_json_bytes": len(json.dumps(raw)),
                     "bytes_per_hold": round(ddb_size(raw["holds"]) / in_flight, 1), "wcu_per_call": wcu,
                     "team_calls_per_s_ceiling": ITEM_WCU_PER_S // wcu})
    base = rows[0]["item_bytes"] - rows[0]["bytes_per_hold"] * rows[0]["holds_open"]
    per_hold = rows[-1]["bytes_per_hold"]

    def steady(seconds: float) -> int:    # in flight = rate x call duration (Little's law)
        return max(r for r in range(1, ITEM_WCU_PER_S + 1)
                   if r * 2 * math.ceil((base + per_hold * r * seconds) / 1024) <= ITEM_WCU_PER_S)
    return {"by_holds_open": rows, "steady_state_calls_per_s_by_call_seconds": {s: steady(s) for s in (1, 2, 5, 10)},
            "holds_before_400kb_item_limit": int((400 * 1024 - base) // per_hold)}


def run() -> dict:
    stack, admin_key = start_stack()
    from chalice.test import Client

    from app import app
    from chalicelib.domain import budget as budget_rules
    from chalicelib.domain import pricing

    install_probe()
    price = pricing.Price(MODEL, Decimal(1000), Decimal(1000), Decimal(1000), "", "", False)
    worst = budget_rules.worst_case_micro(price, budget_rules.prompt_tokens_estimate([MESSAGES, None]), MAX_TOKENS)
    with Client(app, stage_name="local", project_dir=str(ROOT)) as c:
        admin(c, admin_key, "put", f"/v1/admin/prices/{MODEL}", {"input_usd_per_1m": "1000",
                                                                 "output_usd_per_1m": "1000"})
        out = {"benchmark": "money", "faults": FAULTS,
               "budget_covers_50": phase(stack, c, admin_key, COVERED, worst, seed=11),
               "budget_covers_10000": phase(stack, c, admin_key, COVERED_AMPLE, worst, seed=12),
               "warm_path": warm_path(stack, c, admin_key), "budget_item_scale": hot_item(c, admin_key, worst)}
    stack.stop()
    return out


if __name__ == "__main__":
    result = run()
    print(json.dumps(result, indent=2))
    sys.exit(1 if any(result[k]["invariants_failed"] for k in ("budget_covers_50", "budget_covers_10000")) else 0)
