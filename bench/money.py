"""Money under DynamoDB faults (issues #11, #28): 200 simultaneous chat calls against a team budget with
AWS-style conflicts and 5% throttles on every table, then the repairs and the invariants (exit 1 if one
fails): spend within the limit, every served call on the ledger once, daily totals = ledger, nothing
left set aside, `insufficient_quota` only when the budget was really short, other refusals 503. Also
the warm path (faults off vs on), one team's throughput against a per-partition-key write limit (the
fault layer's `partition_write_rate`, AWS's ~1,000 writes a second per key scaled down to 50), and
the per-team ceiling on AWS, on paper, from the measured writes per call."""
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
PARTITION_RATE = 20            # the same, scaled down for this machine (the fault layer's partition_write_rate)
OLD_CEILING = PARTITION_RATE // 2   # before slices every call wrote the team's period item twice
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
    from chalicelib.spend import budgets, ledger, metering, slices
    from chalicelib.store.models import BudgetPeriod, UsageDaily

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
    slices.lender().give_back_all()                      # the instance goes idle
    dead = metering.drain_dead_letters()
    repaired = metering.release_expired_holds(now=time.time() + budgets.HOLD_TTL_SECONDS + 60, team_ids=[team_id])
    metering.aggregate_team(team_id)
    item = BudgetPeriod.get(team_id, budget_rules.period_of(time.time()), consistent_read=True)
    entries, daily = ledger.entries(team_id), list(UsageDaily.query(team_id))
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
        # One instance here: room held by "other instances" would be a miscount of its own slices.
        "refusals_are_quota_or_503": set(outcomes) <= {"ok", "429 insufficient_quota", "503 service_unavailable"},
        "nothing_left_set_aside": not budgets.open_holds(item),
        # A team found without room is believed so for a second (no write per refused call), so
        # not every insufficient_quota is its own refused write: at least one is.
        "quota_refusals_seen_by_dynamodb": all(r[2] for r in refused) and (quota == 0 or refused),
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


def throughput(stack, c, admin_key, worst: int, threads: int = 24, calls: int = 3000) -> dict:
    """One team as fast as this machine drives it, every partition key limited to PARTITION_RATE writes
    a second, the budget running out on the way: calls a second, throttled calls, overshoot."""
    import openai

    from chalicelib.domain import budget as budget_rules
    from chalicelib.domain import pricing
    from chalicelib.spend import ledger, metering, slices
    from chalicelib.store.models import BudgetPeriod

    team_id, key = new_team(admin_key, "money-throughput")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.dataplane_port}/v1", api_key=key, max_retries=0)
    admin(c, admin_key, "put", f"/v1/admin/teams/{team_id}/budget", {"limit_usd": "1000"})
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
    cost = budget_rules.to_micro(first.headers["x-rft-cost-usd"], 10**12)
    slices.lender().give_back_all()
    limit = cost * (calls * 2 // 3)                  # runs out about two thirds of the way
    admin(c, admin_key, "put", f"/v1/admin/teams/{team_id}/budget", {"limit_usd": pricing.usd(limit + cost)})
    stack.ddb_faults.reset()
    stack.ddb_faults.configure(partition_write_rate=PARTITION_RATE)
    outcomes: Counter = Counter()
    served_at: list[float] = []
    lock = threading.Lock()

    def one(_):
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
            outcome = "ok"
        except Exception as err:  # noqa: BLE001 - every outcome is counted
            outcome = f"{getattr(err, 'status_code', type(err).__name__)} {getattr(err, 'code', '')}"
        with lock:
            outcomes[outcome] += 1
            if outcome == "ok":
                served_at.append(time.perf_counter())
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(calls)))
    counters = stack.ddb_faults.counters()
    stack.ddb_faults.reset()
    slices.lender().give_back_all()
    metering.aggregate_team(team_id)
    item = BudgetPeriod.get(team_id, budget_rules.period_of(time.time()), consistent_read=True)
    entries = ledger.entries(team_id)
    seconds = max(served_at) - started
    rate = round(outcomes["ok"] / seconds, 1)
    throttled = sum(n for o, n in outcomes.items() if o not in ("ok", "429 insufficient_quota"))
    checks = {"no_throttled_call": throttled == 0,
              "no_overshoot": item.spent <= limit + cost and sum(int(e.cost_micro) for e in entries) == item.spent,
              "budget_ran_out": outcomes["429 insufficient_quota"] > 0,
              "served_on_ledger_once": len(entries) == outcomes["ok"] + 1,
              "several_times_the_old_ceiling": rate >= 3 * OLD_CEILING}
    return {"partition_write_rate": PARTITION_RATE, "threads": threads, "calls": calls, "outcomes": dict(outcomes),
            "served_calls_per_s": rate,
            "old_ceiling_calls_per_s": OLD_CEILING,
            "dynamodb_throttles_injected": counters["faults"], "hottest_partitions_writes": counters["hottest_partitions"],
            "writes_forwarded_per_served_call": round(
                sum(counters["forwarded"].get(op, 0) for op in ("PutItem", "UpdateItem")) / outcomes["ok"], 3),
            "invariants_failed": [k for k, ok in checks.items() if not ok]}


def instance_lifetimes(stack, admin_key, budget_shards: int, instances: int = 300, threads: int = 24,
                       calls_each: int = 2) -> dict:
    """Many short-lived simulated instances (each a Lender of its own, as each Lambda environment
    is): each takes a slice, serves `calls_each` calls against it and gives it back -- two writes
    on the item its slice is carved from. With one budget item (RFT_BUDGET_SHARDS=1) every slice
    is the team's period item's; with shards they spread over `budget_shards` items. Every partition
    key limited to PARTITION_RATE writes a second: instances served a second, throttled calls."""
    import os
    import uuid

    from chalicelib.domain import budget as budget_rules
    from chalicelib.domain import ids, pricing
    from chalicelib.errors import ApiError
    from chalicelib.spend import budgets, ledger, metering, slices

    os.environ["RFT_BUDGET_SHARDS"] = str(budget_shards)
    os.environ["RFT_BUDGET_ROOT_SLICES"] = "0"          # every slice from a shard (when there are shards)
    team_id, _ = new_team(admin_key, f"money-shards-{budget_shards}")
    worst = 30_000
    limit = worst * instances * calls_each * 4
    budgets.set_budget(team_id, {"limit_usd": pricing.usd(limit), "alert_thresholds": [0.5]})
    stack.ddb_faults.reset()
    stack.ddb_faults.configure(partition_write_rate=PARTITION_RATE)
    outcomes: Counter = Counter()
    lock = threading.Lock()

    def lifetime(_):
        lender = slices.Lender(idle_timer=False)
        results = []
        for _ in range(calls_each):
            try:
                admission = lender.admit(team_id, worst, "s")
            except ApiError as err:
                results.append(f"{err.status} {err.code}")
                continue
            ledger.write(ledger.new_entry(team_id, ids.now_ms(), str(uuid.uuid4()), admission.hold_id, model="m",
                                          upstream_model="m", endpoint="/chat/completions", status=200,
                                          cost_micro=worst // 2, reserved_micro=worst))
            lender.finish(admission, worst // 2)
            results.append("ok")
        lender.give_back_all()
        with lock:
            outcomes.update(results)
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lifetime, range(instances)))
    seconds = time.perf_counter() - started
    counters = stack.ddb_faults.counters()
    stack.ddb_faults.reset()
    # Slices whose give-back DynamoDB throttled past its retries: closed from the ledger, as the
    # reconciler does once their calls surely ended; then the idle shards are folded into the root.
    metering.drain_dead_letters()
    metering.release_expired_holds(now=time.time() + budgets.HOLD_TTL_SECONDS + 960, team_ids=[team_id])
    item = budgets.period_item(team_id, budget_rules.period_of(time.time()))
    entries = ledger.entries(team_id)
    checks = {"no_overshoot": item.spent <= limit,
              "spend_equals_ledger": item.spent == sum(int(e.cost_micro) for e in entries),
              "served_on_ledger_once": len(entries) == outcomes["ok"],
              "nothing_left_set_aside": item.committed == item.spent and not budgets.open_holds(item)}
    for name in ("RFT_BUDGET_SHARDS", "RFT_BUDGET_ROOT_SLICES"):
        os.environ.pop(name, None)
    throttles = counters["faults"].get("ProvisionedThroughputExceededException", {})
    return {"budget_shards": budget_shards, "partition_write_rate": PARTITION_RATE, "instances": instances,
            "calls_each": calls_each, "seconds": round(seconds, 2), "outcomes": dict(outcomes),
            "instances_served_per_s": round(instances / seconds, 1),
            "calls_served_per_s": round(outcomes["ok"] / seconds, 1),
            "budget_writes_throttled_by_dynamodb": sum(throttles.values()),
            "hottest_partitions_writes": counters["hottest_partitions"],
            "invariants_failed": [k for k, ok in checks.items() if not ok]}


def on_paper(writes_per_call: float) -> dict:
    """The per-team ceiling on AWS, from AWS's per-partition write limit and what a call writes."""
    from chalicelib.spend import budgets, ledger, shards, slices

    ledger_shards, budget_shards = ledger.shards(), shards.count()
    slice_bytes = 30                                 # one slice in an item's map: id + amount
    window = budgets.SLICE_WINDOW_SECONDS * 0.8      # renewed ahead of its window's end
    # One budget item (the root, or a shard): one renewal per instance per window, billed on the item's size.
    per_item = max(n for n in range(1, 100_000)
                   if (n / window) * math.ceil((200 + n * slice_bytes) / 1024) <= ITEM_WCU_PER_S)
    # With shards, root slices stop at root_slices_max(); the root takes grants: at most one per
    # GRANT_SLICES slice renewals, each a transaction (2 units per KB) on an item of ~17 grants + those slices.
    instances = per_item if budget_shards == 1 else budget_shards * per_item
    root_kb = math.ceil((200 + (budget_shards + shards.root_slices_max()) * slice_bytes) / 1024)
    root_wcu = (instances / window / slices.GRANT_SLICES) * 2 * root_kb if budget_shards > 1 else 0
    return {"ledger_shards": ledger_shards, "ledger_calls_per_s": ledger_shards * ITEM_WCU_PER_S,
            "budget_shards": budget_shards, "instances_holding_slices_per_budget_item": per_item,
            "instances_holding_slices": instances,
            "root_item_grant_wcu_per_s_at_that_many": round(root_wcu, 1),
            "calls_per_s_by_call_seconds": {s: min(ledger_shards * ITEM_WCU_PER_S, int(instances / s))
                                            for s in (0.1, 0.5, 1, 2, 5, 10)},
            "longest_call_seconds_at_10000_per_s": round(instances / 10_000, 2),
            "measured_dynamodb_writes_per_call": writes_per_call}


def run_throughput() -> dict:
    """`--throughput`: the per-key ceiling moving with budget shards (simulated instances), one
    item vs several, and the ceiling on paper."""
    stack, admin_key = start_stack()
    out = {"benchmark": "money --throughput",
           "one_budget_item": instance_lifetimes(stack, admin_key, 1),
           "eight_budget_shards": instance_lifetimes(stack, admin_key, 8)}
    out["per_team_ceiling_on_aws"] = on_paper(None)
    stack.stop()
    return out


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
               "warm_path": warm_path(stack, c, admin_key)}
        out["throughput"] = throughput(stack, c, admin_key, worst)
        out["per_team_ceiling_on_aws"] = on_paper(out["warm_path"]["faults_off"]["dynamodb_forwarded_per_call"])
    stack.stop()
    return out


if __name__ == "__main__":
    if "--throughput" in sys.argv:
        result = run_throughput()
        print(json.dumps(result, indent=2))
        sys.exit(1 if any(result[k]["invariants_failed"] for k in ("one_budget_item", "eight_budget_shards")) else 0)
    result = run()
    print(json.dumps(result, indent=2))
    sys.exit(1 if any(result[k]["invariants_failed"] for k in ("budget_covers_50", "budget_covers_10000",
                                                                "throughput")) else 0)
