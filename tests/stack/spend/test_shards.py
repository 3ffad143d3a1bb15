"""Budget shards (spend/shards.py) on a DynamoDB as strict as AWS.

Simulated instances (each a `Lender`, as in test_slices.py) carve their slices from shard items
`<team>#bNN` that the team's root item grants room to. The invariants of test_slices.py hold
across shards: admitted calls never cost more than the limit; a refusal is `insufficient_quota`
only when the budget as a whole has no room; once idle and reconciled nothing is held anywhere
(every shard folded back into the root) and the ledger, the budget and the usage report agree.
"""
import random
import threading
import time

import pytest
from test_slices import WORST, assert_books_agree, call, far, reconcile, with_budget

from chalicelib.domain import budget as budget_rules
from chalicelib.domain import pricing
from chalicelib.errors import ApiError
from chalicelib.spend import budgets, shards, slices


@pytest.fixture
def sharded(monkeypatch):
    """Four shards, and every slice from a shard (no root slices first)."""
    monkeypatch.setenv("RFT_BUDGET_SHARDS", "4")
    monkeypatch.setenv("RFT_BUDGET_ROOT_SLICES", "0")


def place(lender: slices.Lender, team_id: str, n: int) -> slices.Lender:
    lender._shard[team_id] = n       # noqa: SLF001 - which shard this simulated instance drew
    return lender


def raw(key: str):
    return budgets.raw_item(key, budget_rules.period_of(time.time()))


def shard_items(team_id: str) -> list:
    return [raw(shards.pk(team_id, n)) for n in range(shards.count())]


def assert_nothing_on_shards(team_id: str) -> None:
    root = raw(team_id)
    assert not [h for h in budgets.open_holds(root) if shards.is_grant(h)]       # every grant folded back
    assert root.committed == root.spent and not budgets.open_holds(root)
    for item in shard_items(team_id):
        assert not budgets.open_holds(item) and not int(item.room or 0) and not int(item.granted or 0)


def test_200_calls_from_eight_instances_on_four_shards_under_faults_never_pass_a_budget_for_50(
        make_team, stack, ddb_faults, sharded):
    team_id, limit = with_budget(make_team, 50)
    instances = [place(slices.Lender(idle_timer=False), team_id, i % 4) for i in range(8)]
    rng = random.Random(5)
    costs = [rng.randint(WORST // 4, WORST) for _ in range(200)]
    outcomes, lock = [], threading.Lock()
    ddb_faults.configure(conflicts=True, seed=4,
                         rules=[{"operation": "*", "table": "*", "rate": 0.07, "error": "ThrottlingException"}])

    def worker(n: int) -> None:
        for i in range(n, 200, 16):
            result = call(instances[i % 8], team_id, costs[i])
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    counters = ddb_faults.counters()
    assert counters["faults"] and counters["forwarded"].get("TransactWriteItems")    # faults; grants made
    ddb_faults.reset()
    served = [o for o in outcomes if not isinstance(o, ApiError)]
    refused = {o.code for o in outcomes if isinstance(o, ApiError)}
    assert refused <= {"insufficient_quota", "budget_held", "service_unavailable"}, refused
    assert sum(e.cost_micro for e in served) > limit // 2
    assert sum(e.cost_micro for e in served) <= limit                       # admitted calls never cost more
    assert sum(1 for item in shard_items(team_id) if item.grants) >= 2     # the load really spread
    for lender in instances:                                                # the instances go idle
        lender.give_back_all()
    # Room held in other instances' slices was budget_held (retryable); once they are idle every
    # call is served until the budget as a whole has no room, and only then insufficient_quota.
    for _ in range(60):
        result = call(instances[0], team_id, WORST)                          # one instance: no slice held elsewhere
        if isinstance(result, ApiError):
            break
        served.append(result)
    assert result.code == "insufficient_quota", (result, limit, [(i.team_id, i.attribute_values) for i in (
        raw(team_id), *shard_items(team_id))], [(s.pk, s.amount, s.used, s.inflight, s.retired, s.returning)
                                                for lender in instances for s in lender._slices()])
    assert limit - sum(e.cost_micro for e in served) < WORST                 # really no room left
    for lender in instances:
        lender.give_back_all()
    assert 0.5 in raw(team_id).alerted                                      # the threshold fired from shard spend
    report = reconcile(far())
    assert report["shards_folded"] >= 1
    budgets_item = budgets.period_item(team_id, budget_rules.period_of(time.time()))
    assert budgets_item.spent == raw(team_id).spent                         # all spend back in the root
    from chalicelib.spend import metering
    metering.aggregate_team(team_id)
    assert_books_agree(team_id, limit, len(served))
    assert_nothing_on_shards(team_id)


def test_a_team_with_room_only_on_another_shard_is_served_not_refused(make_team, stack, sharded):
    team_id, limit = with_budget(make_team, 100)
    first, second = place(slices.Lender(idle_timer=False), team_id, 0), place(slices.Lender(idle_timer=False),
                                                                                team_id, 1)
    call(first, team_id, WORST // 10)                                       # shard 0 is granted a share
    first.give_back_all()                                                   # its slice back on shard 0: free room there
    s0 = raw(shards.pk(team_id, 0))
    assert int(s0.room) > 0 and not budgets.open_holds(s0)
    root_free = limit - int(raw(team_id).committed)
    big = root_free + int(s0.room) // 2                                     # more than the root has, less than the team
    assert big > root_free and big <= limit - WORST // 10
    admission = second.admit(team_id, big, "s")                            # served: shard 0's room came back
    assert admission.slice.pk == shards.pk(team_id, 1)
    second.finish(admission, big // 2)
    second.give_back_all()
    # Before the reconciler folds them, the spend is on two shards: the budget view sums them.
    assert raw(team_id).spent == 0
    view = budgets.view(team_id)
    assert view["spent_usd"] == pricing.usd(WORST // 10 + big // 2) and view["reserved_usd"] == pricing.usd(0)
    assert view["remaining_usd"] == pricing.usd(limit - WORST // 10 - big // 2) and view["open_holds"] == 0
    reconcile(far())
    item = budgets.period_item(team_id, budget_rules.period_of(time.time()))
    assert item.spent == WORST // 10 + big // 2 and item.committed == item.spent
    assert_nothing_on_shards(team_id)


def test_a_budget_lowered_below_what_shards_hold_admits_nothing_beyond_it(make_team, stack, sharded):
    team_id, _ = with_budget(make_team, 100)
    one, two = place(slices.Lender(idle_timer=False), team_id, 0), place(slices.Lender(idle_timer=False), team_id, 1)
    for lender in (one, two):
        for _ in range(2):
            call(lender, team_id, WORST // 2)
        lender.give_back_all()                                              # its slice's room back on its shard
    assert all(int(raw(shards.pk(team_id, n)).room) > WORST for n in (0, 1))   # both shards hold free room
    spent = 4 * (WORST // 2)
    new_limit = spent + WORST + WORST // 2                                  # room for one more worst case
    budgets.set_budget(team_id, {"limit_usd": pricing.usd(new_limit)})
    first = one.admit(team_id, WORST, "s")                                  # fits the new limit
    with pytest.raises(ApiError) as refused:
        two.admit(team_id, WORST, "s")                                      # beyond it, though shard 1 had room
    assert refused.value.code in ("insufficient_quota", "budget_held")
    with pytest.raises(ApiError):
        one.admit(team_id, WORST, "s")
    one.finish(first, WORST)
    for lender in (one, two):
        lender.give_back_all()
    reconcile(far())
    item = budgets.period_item(team_id, budget_rules.period_of(time.time()))
    assert item.spent == spent + WORST <= new_limit and item.committed == item.spent
    assert_nothing_on_shards(team_id)


def test_a_grant_whose_answer_is_lost_is_not_granted_twice(make_team, stack, ddb_faults, sharded):
    team_id, _ = with_budget(make_team, 100)
    lender = place(slices.Lender(idle_timer=False), team_id, 2)
    period = budget_rules.period_of(time.time())
    shards.ensure(team_id, period, None)                                    # both items there: the grant's
    shards.ensure(team_id, period, 2)                                       # first attempt is applied
    # The grant's transaction is applied by DynamoDB and its answer lost (a 500): the retry
    # finds its grant id on the shard and is not applied again.
    ddb_faults.configure(rules=[{"operation": "TransactWriteItems", "table": "*", "next": 1,
                                 "error": "InternalServerError", "after": True}])
    admission = lender.admit(team_id, WORST, "s")
    assert ddb_faults.counters()["faults"] == {"InternalServerError after applying": {"TransactWriteItems": 1}}
    ddb_faults.reset()
    shard, root = raw(shards.pk(team_id, 2)), raw(team_id)
    (slice_amount,) = budgets.open_holds(shard).values()
    assert len(shard.grants.as_dict()) == 1                                 # one grant recorded
    assert int(shard.granted) == slices.GRANT_SLICES * slice_amount         # granted once, not twice
    assert budgets.open_holds(root) == {shards.grant_hold(2): int(shard.granted)}
    assert int(root.committed) == int(shard.granted)                        # the root set it aside once
    lender.finish(admission, WORST // 3)
    lender.give_back_all()
    reconcile(far())
    item = budgets.period_item(team_id, budget_rules.period_of(time.time()))
    assert item.spent == item.committed == WORST // 3
    assert_nothing_on_shards(team_id)


def test_a_slice_taken_before_a_budget_was_lowered_gives_back_room_that_admits_nothing_beyond_it(
        make_team, stack, sharded):
    """test_slices' lowered-budget case with every slice on a shard: the old slice's unused room,
    given back to its shard after the change, is not usable until the root checks a grant against
    the new limit (a reclaim does not mark the shard's room as checked)."""
    import test_slices
    test_slices.test_a_budget_lowered_below_what_slices_hold_admits_nothing_beyond_it(make_team, stack)


def test_test_slices_fault_case_holds_on_shards(make_team, stack, ddb_faults, sharded):
    import test_slices
    test_slices.test_200_calls_from_four_instances_under_faults_never_pass_a_budget_for_50(make_team, stack,
                                                                                            ddb_faults)
