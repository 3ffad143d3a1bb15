"""A key's own monthly budget inside its team's (issue #29): every call made with the key must fit
both; the refusal names the budget that is exhausted; the team's budget still caps the sum."""
import json

import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_money import MESSAGES, MODEL, admin, priced_team
from test_slices import far, reconcile

from chalicelib.domain import budget as budget_rules
from chalicelib.domain import pricing
from chalicelib.spend import budgets, ledger, metering, slices


def new_key(api, admin_headers, team_id):
    body = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers).json_body
    return body["id"], body["key"]


def spend_until_refused(client, limit_calls: int = 20):
    served = 0
    for _ in range(limit_calls):
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)
            served += 1
        except openai.RateLimitError as err:
            return served, err
    raise AssertionError("never refused")


def test_a_key_is_refused_after_its_own_budget_while_another_key_of_the_team_is_served(
        api, admin_headers, make_team, stack):
    team_id, _, _, worst = priced_team(api, admin_headers, make_team, stack, calls_covered=100)
    capped_id, capped = new_key(api, admin_headers, team_id)
    other_id, other = new_key(api, admin_headers, team_id)
    r = admin(api, admin_headers, "put", f"/v1/admin/teams/{team_id}/keys/{capped_id}/budget",
              {"limit_usd": pricing.usd(3 * worst)})
    assert r.json_body["key_id"] == capped_id and r.json_body["limit_usd"] == pricing.usd(3 * worst)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=capped, max_retries=0)
    served, refused = spend_until_refused(client)
    assert refused.code == "insufficient_quota" and f"API key {capped_id}'s own" in refused.message
    costs = [e.cost_micro for e in ledger.entries(team_id) if e.key_id == capped_id and e.outcome == "served"]
    assert len(costs) == served and 3 * worst - worst < sum(costs) <= 3 * worst    # refused only with no room left
    other_client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=other, max_retries=0)
    other_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)   # the team has room
    slices.lender().give_back_all()
    # The key's spend is exact: what its calls cost on the ledger.
    key_cost = sum(e.cost_micro for e in ledger.entries(team_id) if e.key_id == capped_id and e.outcome == "served")
    view = admin(api, admin_headers, "get", f"/v1/admin/teams/{team_id}/keys/{capped_id}/budget").json_body
    assert view["spent_usd"] == pricing.usd(key_cost) and view["open_holds"] == 0
    audit = api.http.get(f"/v1/admin/audit?action=budget.set&target=key:{capped_id}", headers=admin_headers).json_body
    assert len(audit["data"]) == 1 and audit["data"][0]["team_id"] == team_id
    r = api.http.get(f"/v1/admin/teams/{team_id}/keys/{other_id}/budget", headers=admin_headers).json_body
    assert r["limit_usd"] is None                                          # no budget of its own


def test_the_teams_budget_still_caps_the_sum_of_its_keys(api, admin_headers, make_team, stack):
    team_id, first_client, _, worst = priced_team(api, admin_headers, make_team, stack, calls_covered=3)
    key_id, key = new_key(api, admin_headers, team_id)
    admin(api, admin_headers, "put", f"/v1/admin/teams/{team_id}/keys/{key_id}/budget",
          {"limit_usd": pricing.usd(10 * worst)})                            # more than the team's own
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    served, refused = spend_until_refused(client)
    assert refused.code == "insufficient_quota" and "team's" in refused.message
    costs = [e.cost_micro for e in ledger.entries(team_id) if e.outcome == "served"]
    assert len(costs) == served and 3 * worst - worst < sum(costs) <= 3 * worst    # the team's limit, not the key's
    slices.lender().give_back_all()
    reconcile(far())
    for owner in (team_id, budgets.key_owner(team_id, key_id)):
        item = budgets.period_item(owner, budget_rules.period_of(__import__("time").time()))
        assert item.committed == item.spent and not budgets.open_holds(item)   # nothing held on either


def test_a_killed_instances_key_slice_is_closed_at_the_keys_ledger_cost(api, admin_headers, make_team, stack):
    team_id, _, _, worst = priced_team(api, admin_headers, make_team, stack, calls_covered=100)
    key_id, key = new_key(api, admin_headers, team_id)
    admin(api, admin_headers, "put", f"/v1/admin/teams/{team_id}/keys/{key_id}/budget",
          {"limit_usd": pricing.usd(50 * worst)})
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)
    owner = budgets.key_owner(team_id, key_id)
    period = budget_rules.period_of(__import__("time").time())
    assert budgets.open_holds(budgets.period_item(owner, period))          # the key's slice is held
    slices.lender()._current.clear()                                       # noqa: SLF001 - the instance dies
    metering.release_expired_holds(now=__import__("time").time() + far(), team_ids=[owner])
    item = budgets.period_item(owner, period)
    cost = sum(e.cost_micro for e in ledger.entries(team_id) if e.key_id == key_id)
    assert item.spent == cost > 0 and item.committed == item.spent and not budgets.open_holds(item)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=True), st.none(), st.lists(st.integers())),
       thresholds=st.sampled_from([None, [], [0.5]]))
def test_bad_key_budgets_are_400s_naming_the_field(api, admin_headers, make_team, stack, limit, thresholds):
    team_id, key_id = _team(api, admin_headers)
    body = {"limit_usd": limit}
    if thresholds is not None:
        body["alert_thresholds"] = thresholds
    r = api.http.put(f"/v1/admin/teams/{team_id}/keys/{key_id}/budget", headers=admin_headers, body=json.dumps(body))
    if r.status_code == 200:
        assert not thresholds and budget_rules.to_micro(limit, budget_rules.MAX_BUDGET_MICRO) >= 0
    else:
        assert r.status_code == 400 and r.json_body["error"]["param"] in ("limit_usd", "alert_thresholds")


_made: dict = {}


def _team(api, admin_headers) -> tuple[str, str]:
    """One team and key for every example (a team per example would be slow)."""
    if not _made:
        team = api.http.post("/v1/admin/teams", headers=admin_headers, body=json.dumps({"name": "kb"})).json_body
        _made["ids"] = (team["id"], new_key(api, admin_headers, team["id"])[0])
    return _made["ids"]


def test_another_teams_key_or_an_unknown_key_is_a_404(api, admin_headers, make_team, stack):
    team_a, _ = make_team("a")
    team_b, _ = make_team("b")
    key_b, _ = new_key(api, admin_headers, team_b)
    for team, key in ((team_a, key_b), (team_a, "key_nope")):
        for method, body in (("put", json.dumps({"limit_usd": "1"})), ("get", None)):
            kwargs = {"headers": admin_headers, **({"body": body} if body else {})}
            r = getattr(api.http, method)(f"/v1/admin/teams/{team}/keys/{key}/budget", **kwargs)
            assert r.status_code == 404, (method, r.json_body)

