"""Budget owners and shard keys (spend/budgets.py, spend/shards.py) and the fault layer's `after` rules."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chalicelib.spend import budgets, shards
from chalicelib.store.models import Budget
from local import ddb_faults

team_ids = st.from_regex(r"team-[0-9a-f]{16}", fullmatch=True)
key_ids = st.from_regex(r"key_[0-9A-Za-z]{1,24}", fullmatch=True)


@given(team=team_ids, key=key_ids)
def test_a_keys_owner_id_round_trips_and_a_team_is_not_a_key(team, key):
    owner = budgets.key_owner(team, key)
    assert budgets.owner_key(owner) == (team, key)
    assert budgets.owner_key(team) is None


@given(team=team_ids, key=key_ids, limit=st.integers(1, 10**12))
def test_the_refusal_names_the_budget_that_is_exhausted(team, key, limit):
    keyed = budgets.over_budget(1, Budget(budgets.key_owner(team, key), limit_micro=limit), "2026-12")
    teams = budgets.over_budget(1, Budget(team, limit_micro=limit), "2026-12")
    assert f"API key {key}'s own" in keyed.message and "team's" not in keyed.message
    assert "team's" in teams.message and "API key" not in teams.message
    assert keyed.code == teams.code == "insufficient_quota"


@given(team=team_ids, n=st.integers(0, 98))
def test_shard_keys_are_distinct_partition_keys_and_grant_holds_name_their_shard(team, n):
    assert shards.pk(team, n) != team and shards.pk(team, n).startswith(team + "#b")
    hold = shards.grant_hold(n)
    assert shards.is_grant(hold) and shards.shard_of(hold) == n
    assert not budgets.is_slice(hold) and budgets.closable_at(hold) is None    # never expired by the reconciler


def test_the_fault_layers_after_flag_is_a_boolean():
    assert ddb_faults._rule({"error": "InternalServerError", "next": 1, "after": True})["after"] is True
    assert ddb_faults._rule({"error": "InternalServerError", "next": 1})["after"] is False
    with pytest.raises(ValueError, match="after"):
        ddb_faults._rule({"error": "InternalServerError", "next": 1, "after": "yes"})
