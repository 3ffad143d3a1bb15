"""Budget slices (spend/slices.py) on a DynamoDB as strict as AWS.

Several instances are simulated in this process, each a `Lender` of its own (as each Lambda
environment has its own memory); a simulated call is what the gateway does around Bedrock:
admit the worst case, write the ledger entry, put the real cost on the slice. The invariants:
admitted calls never cost more than the limit; once the instances are idle (or dead) and the
reconciler ran, nothing is set aside and the ledger, the budget and the usage report agree.
"""
import random
import threading
import time
import uuid

import pytest

from chalicelib.domain import budget as budget_rules
from chalicelib.domain import ids, pricing
from chalicelib.errors import ApiError
from chalicelib.spend import budgets, ledger, metering, slices

WORST = 30_000          # micro-USD: a call's worst case


def with_budget(make_team, calls: int) -> tuple[str, int]:
    team_id, _ = make_team("slices")
    budgets.set_budget(team_id, {"limit_usd": pricing.usd(calls * WORST), "alert_thresholds": [0.5]})
    return team_id, calls * WORST


def call(lender: slices.Lender, team_id: str, cost: int, worst: int = WORST):
    """One simulated metered call; returns its ledger entry, or the error that refused it."""
    try:
        admission = lender.admit(team_id, worst, "s")
    except ApiError as err:
        return err
    entry = ledger.new_entry(team_id, ids.now_ms(), str(uuid.uuid4()), admission.hold_id, model="m",
                             upstream_model="m", endpoint="/chat/completions", status=200, cost_micro=cost,
                             reserved_micro=worst)
    ledger.write(entry)
    lender.finish(admission, cost)
    return entry


def period(team_id):
    return budgets.period_item(team_id, budget_rules.period_of(time.time()))


def reconcile(now_offset: float = 0.0) -> dict:
    metering.drain_dead_letters()
    return metering.release_expired_holds(now=time.time() + now_offset)


def far() -> float:
    """Later than any slice or hold could still have a call running."""
    return budgets.HOLD_TTL_SECONDS + budgets.SLICE_WINDOW_SECONDS + 900


def assert_books_agree(team_id: str, limit: int, served: int) -> None:
    item = period(team_id)
    entries = [e for e in ledger.entries(team_id) if e.outcome == "served"]
    assert len(entries) == served                                           # every served call, once
    assert sum(e.cost_micro for e in entries) == item.spent <= limit         # never past the limit
    assert item.committed == item.spent and not budgets.open_holds(item)     # nothing left set aside
    usage = metering.report([team_id], None, None, "day")
    assert usage["totals"]["cost_micro"] == item.spent and usage["totals"]["requests"] == served


def test_200_calls_from_four_instances_under_faults_never_pass_a_budget_for_50(make_team, stack, ddb_faults):
    team_id, limit = with_budget(make_team, 50)
    instances = [slices.Lender(idle_timer=False) for _ in range(4)]
    rng = random.Random(7)
    costs = [rng.randint(WORST // 4, WORST) for _ in range(200)]
    outcomes, lock = [], threading.Lock()
    ddb_faults.configure(conflicts=True, seed=3,
                         rules=[{"operation": "*", "table": "*", "rate": 0.07, "error": "ThrottlingException"}])

    def worker(n: int) -> None:
        for i in range(n, 200, 20):
            result = call(instances[i % 4], team_id, costs[i])
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert ddb_faults.counters()["faults"]                                   # faults really were injected
    ddb_faults.reset()
    served = [o for o in outcomes if not isinstance(o, ApiError)]
    refused = {o.code for o in outcomes if isinstance(o, ApiError)}
    assert refused <= {"insufficient_quota", "budget_held", "service_unavailable"}, refused
    # the budget ran out (or, at that moment, what was left sat in another instance's slice or another
    # shard: budget_held, which a retry gets back; which of the two a late call meets is timing) ...
    assert refused & {"insufficient_quota", "budget_held"}
    assert sum(e.cost_micro for e in served) > limit // 2                   # ... not long before
    assert sum(e.cost_micro for e in served) <= limit                       # admitted calls never cost more
    for lender in instances:                                                # the instances go idle
        lender.give_back_all()
    reconcile(far())
    metering.aggregate_team(team_id)
    assert_books_agree(team_id, limit, len(served))


def test_a_killed_instances_slice_is_closed_from_the_ledger_after_expiry(make_team, stack):
    team_id, limit = with_budget(make_team, 100)
    dead = slices.Lender(idle_timer=False)
    entries = [call(dead, team_id, cost) for cost in (10_000, 20_000, 5_000)]
    (slice_id,) = budgets.open_holds(period(team_id))
    # One more of its calls whose ledger write was dead-lettered: the slice must wait for it.
    late = ledger.new_entry(team_id, ids.now_ms(), str(uuid.uuid4()), slice_id, model="m", upstream_model="m",
                            endpoint="/chat/completions", status=200, cost_micro=7_000, reserved_micro=WORST)
    from chalicelib.adapters import queues
    queues.send(ledger.ledger_dlq(), ledger.entry_json(late))
    del dead                                                 # killed: its slice is never given back
    assert metering.release_expired_holds()["slices_closed"] == 0           # its calls may still run
    assert metering.release_expired_holds(now=time.time() + far())["slices_closed"] == 0   # a dead letter waits
    assert slice_id in budgets.open_holds(period(team_id))
    assert reconcile(far())["slices_closed"] == 1                           # drained, then closed
    item = period(team_id)
    assert item.spent == sum(e.cost_micro for e in entries) + late.cost_micro     # what the ledger holds
    assert item.committed == item.spent and not budgets.open_holds(item)
    assert reconcile(far())["slices_closed"] == 0                           # once


def test_a_budget_lowered_below_what_slices_hold_admits_nothing_beyond_it(make_team, stack):
    team_id, _ = with_budget(make_team, 100)
    lender = slices.Lender(idle_timer=False)
    for _ in range(2):
        call(lender, team_id, WORST // 2)
    held = period(team_id)
    assert held.committed - held.spent > 2 * WORST                          # the slice holds room
    spent = sum(e.cost_micro for e in ledger.entries(team_id))
    new_limit = spent + WORST + WORST // 2                                  # room for one more worst case
    budgets.set_budget(team_id, {"limit_usd": pricing.usd(new_limit)})
    first = lender.admit(team_id, WORST, "s")                              # fits the new limit
    with pytest.raises(budgets.OverBudget):
        lender.admit(team_id, WORST, "s")                                  # beyond it, though the old slice had room
    lender.finish(first, WORST)
    lender.give_back_all()
    item = period(team_id)
    assert item.spent <= new_limit and item.committed == item.spent and not budgets.open_holds(item)


def test_room_set_aside_by_an_idle_instance_comes_back_instead_of_a_refusal(make_team, stack):
    team_id, limit = with_budget(make_team, 100)
    idle, busy = slices.Lender(idle_timer=False), slices.Lender(idle_timer=False)
    call(idle, team_id, WORST // 10)                                        # takes a slice, then sits idle
    (held,) = budgets.open_holds(period(team_id)).values()
    big = limit - held // 2                                                 # fits the budget, not what is free
    with pytest.raises(slices.BudgetHeld) as refused:
        busy.admit(team_id, big, "s")
    assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1   # retryable, timed
    idle.give_back_idle(0)                                                  # its idle timer gives the slice back
    admission = busy.admit(team_id, big, "s")                               # the room came back
    busy.finish(admission, big // 2)
    busy.give_back_all()
    item = period(team_id)
    assert item.spent == WORST // 10 + big // 2 and item.committed == item.spent


def test_near_the_end_of_a_budget_slices_are_per_call(make_team, stack):
    team_id, limit = with_budget(make_team, 10)
    lender = slices.Lender(idle_timer=False)
    served = [e for e in (call(lender, team_id, WORST) for _ in range(12)) if not isinstance(e, ApiError)]
    assert len(served) == 10                                                # every cent, no more
    item = period(team_id)
    assert not budgets.open_holds(item)                                     # per-call slices: given back at once
    assert item.spent == item.committed == limit
