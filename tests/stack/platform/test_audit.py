"""The audit log (issue #29): every security-relevant act leaves exactly one entry, written in the
same transaction as the change (neither without the other, also under DynamoDB faults); a team
key sees its own team's entries; the list pages and filters; each entry is also an outbound event."""
import json
import time
import urllib.parse

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib import outbox
from chalicelib.domain import keys
from chalicelib.platform import audit
from chalicelib.store.models import ApiKey, AuditEntry, Team
from local.example_graders import arn


def _h(key):
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def _entries(api, admin_headers, team_id=None, **query):
    q = "&".join(f"{k}={v}" for k, v in {"team_id": team_id, "limit": 100, **query}.items() if v is not None)
    r = api.http.get(f"/v1/admin/audit?{q}", headers=admin_headers)
    assert r.status_code == 200, r.json_body
    return r.json_body["data"]


def _actions(api, admin_headers, team_id):
    return sorted(e["action"] for e in _entries(api, admin_headers, team_id))


def _all_entries_of(team_id):
    """Straight from the table (consistent, not through the route): what was really written."""
    return [e for e in AuditEntry.query(audit.LOG, consistent_read=True) if e.team_id == team_id]


def test_each_key_and_team_act_leaves_exactly_one_entry(api, admin_headers):
    team = api.http.post("/v1/admin/teams", headers=admin_headers, body=json.dumps({"name": "audited"})).json_body
    team_id = team["id"]
    key = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers,
                        body=json.dumps({"name": "ci", "role": "inference"})).json_body
    rotated = api.http.post(f"/v1/admin/keys/{key['id']}/rotate", headers=admin_headers).json_body
    assert api.http.delete(f"/v1/admin/keys/{rotated['id']}", headers=admin_headers).status_code == 200
    assert api.http.delete(f"/v1/admin/keys/{rotated['id']}", headers=admin_headers).status_code == 200  # a repeat
    assert _actions(api, admin_headers, team_id) == ["key.created", "key.revoked", "key.rotated", "team.created"]

    entries = {e["action"]: e for e in _entries(api, admin_headers, team_id)}
    created = entries["key.created"]
    assert created["actor"] == "admin" and created["target"] == f"key:{key['id']}" and created["request_id"]
    assert created["after"]["role"] == "inference" and created["before"] is None
    assert entries["key.rotated"]["after"]["replaced_by"] == rotated["id"]
    assert entries["key.revoked"]["before"].get("revoked_at") is None and entries["key.revoked"]["after"]["revoked_at"]
    assert key["key"] not in json.dumps(entries) and "key_hash" not in json.dumps(entries)
    assert len(_all_entries_of(team_id)) == 4


def test_lambda_grader_registrations_are_audited_once(api, admin_headers, make_team):
    team_id, _ = make_team("audit-lambda")
    url = f"/v1/admin/teams/{team_id}/lambda_graders"
    name = f"rft-grader-audit-{team_id[-8:]}"
    assert api.http.post(url, headers=admin_headers, body=json.dumps({"function_arn": arn(name)})).status_code == 201
    assert api.http.post(url, headers=admin_headers, body=json.dumps({"function_arn": arn(name)})).status_code == 200
    assert api.http.delete(f"{url}/{name}", headers=admin_headers).status_code == 200
    acts = [a for a in _actions(api, admin_headers, team_id) if a.startswith("lambda_grader.")]
    assert acts == ["lambda_grader.registered", "lambda_grader.unregistered"]


def test_budget_and_price_changes_are_audited_once_with_before_and_after(api, admin_headers, make_team):
    team_id, _ = make_team("audit-money")
    for usd in ("10", "25"):
        r = api.http.put(f"/v1/admin/teams/{team_id}/budget", headers=admin_headers,
                         body=json.dumps({"limit_usd": usd, "alert_thresholds": [0.5]}))
        assert r.status_code == 200, r.json_body
    sets = [e for e in _entries(api, admin_headers, team_id) if e["action"] == "budget.set"]
    assert len(sets) == 2 and sets[0]["target"] == f"team:{team_id}"        # newest first
    assert sets[0]["before"]["limit_micro"] == 10_000_000 and sets[0]["after"]["limit_micro"] == 25_000_000
    assert sets[1]["before"] is None
    model = f"audit-model-{team_id[-6:]}"
    for method, body in (("put", {"input_usd_per_1m": "1", "output_usd_per_1m": "2"}), ("delete", None)):
        kwargs = {"body": json.dumps(body)} if body else {}
        assert getattr(api.http, method)(f"/v1/admin/prices/{model}", headers=admin_headers, **kwargs).status_code == 200
    acts = [e for e in _entries(api, admin_headers) if e["target"] == f"price:{model}"]
    assert [e["action"] for e in acts] == ["price.deleted", "price.set"]
    assert acts[1]["after"]["output"] == "2" and acts[0]["before"]["output"] == "2"


def test_console_sign_in_and_out_are_audited(api, admin_headers, make_team):
    team_id, key = make_team("audit-console")
    r = api.http.post("/console/session", headers={"Content-Type": "application/json"}, body=json.dumps({"key": key}))
    assert r.status_code == 200
    cookie = r.headers["Set-Cookie"].split(";")[0]
    csrf = r.json_body["csrf_token"]
    out = api.http.delete("/console/session", headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert out.status_code == 200 and out.json_body["deleted"]
    entries = [e for e in _entries(api, admin_headers, team_id) if e["action"].startswith("console.")]
    assert sorted(e["action"] for e in entries) == ["console.signed_in", "console.signed_out"]
    key_id = keys.parse_key_id(key)
    assert all(e["actor"].startswith("console:") and e["actor"].endswith(f"/key:{key_id}") for e in entries)


@pytest.mark.parametrize("act", ["team", "key", "rotate", "revoke", "lambda_grader"])
def test_no_change_without_its_entry_and_no_entry_without_its_change(api, admin_headers, make_team, ddb_faults, act):
    """The audit table refuses every write (throttled throughout): the act is a 503 and neither the
    change nor the entry exists. Then refused twice (an unknown outcome) and retried: exactly one of each."""
    team_id, _ = make_team(f"audit-fault-{act}")
    key = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers).json_body
    before = len(_all_entries_of(team_id))
    name = f"rft-grader-fault-{team_id[-8:]}"
    calls = {
        "team": lambda: api.http.post("/v1/admin/teams", headers=admin_headers, body=json.dumps({"name": "x-" + act})),
        "key": lambda: api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers),
        "rotate": lambda: api.http.post(f"/v1/admin/keys/{key['id']}/rotate", headers=admin_headers),
        "revoke": lambda: api.http.delete(f"/v1/admin/keys/{key['id']}", headers=admin_headers),
        "lambda_grader": lambda: api.http.post(f"/v1/admin/teams/{team_id}/lambda_graders", headers=admin_headers,
                                               body=json.dumps({"function_arn": arn(name)})),
    }

    def state():
        teams = sum(1 for t in Team.scan(consistent_read=True) if t.name == "x-" + act)
        team_keys = list(ApiKey.by_team.query(team_id))
        revoked = sum(1 for k in team_keys if k.revoked_at is not None)
        rotated = sum(1 for k in team_keys if k.replaced_by is not None)
        graders = api.http.get(f"/v1/admin/teams/{team_id}/lambda_graders", headers=admin_headers).json_body["data"]
        return teams, len(team_keys), revoked, rotated, len(graders)

    start = state()
    ddb_faults.configure(rules=[{"operation": "TransactWriteItems", "table": "-audit_log", "rate": 1.0,
                                 "error": "ThrottlingException"}])
    r = calls[act]()
    assert r.status_code == 503 and r.json_body["error"]["code"] == "service_unavailable", r.json_body
    ddb_faults.reset()
    assert state() == start and len(_all_entries_of(team_id)) == before

    ddb_faults.configure(rules=[{"operation": "TransactWriteItems", "table": "-audit_log", "next": 2,
                                 "error": "InternalServerError"}])
    r = calls[act]()
    assert r.status_code in (200, 201), r.json_body
    assert ddb_faults.counters()["faults"] == {"InternalServerError": {"TransactWriteItems": 2}}
    ddb_faults.reset()
    delta = tuple(b - a for a, b in zip(start, state()))
    assert delta == {"team": (1, 0, 0, 0, 0), "key": (0, 1, 0, 0, 0), "rotate": (0, 1, 0, 1, 0),
                     "revoke": (0, 0, 1, 0, 0), "lambda_grader": (0, 0, 0, 0, 1)}[act]
    if act == "team":
        made = [e for e in AuditEntry.query(audit.LOG, consistent_read=True, scan_index_forward=False, limit=50)
                if e.action == "team.created" and e.after == {"name": "x-team"}]
        assert len(made) == 1
    else:
        assert len(_all_entries_of(team_id)) == before + 1


def test_a_team_key_sees_its_own_teams_entries_only(api, admin_headers, make_team):
    team_a, key_a = make_team("audit-a")
    team_b, _ = make_team("audit-b")
    read = api.http.post(f"/v1/admin/teams/{team_a}/keys", headers=admin_headers,
                         body=json.dumps({"role": "read"})).json_body["key"]
    inference = api.http.post(f"/v1/admin/teams/{team_a}/keys", headers=admin_headers,
                              body=json.dumps({"role": "inference"})).json_body["key"]
    for key in (key_a, read):
        r = api.http.get("/v1/admin/audit?limit=100", headers=_h(key))
        assert r.status_code == 200
        assert r.json_body["data"] and {e["team_id"] for e in r.json_body["data"]} == {team_a}
        assert api.http.get(f"/v1/admin/audit?team_id={team_b}", headers=_h(key)).status_code == 400
    assert api.http.get("/v1/admin/audit", headers=_h(inference)).status_code == 403
    # A cursor of another team's partition is refused, never followed.
    page = api.http.get(f"/v1/admin/audit?team_id={team_b}&limit=1", headers=admin_headers).json_body
    assert page["has_more"] and page["rft_next_cursor"]
    r = api.http.get(f"/v1/admin/audit?after={page['rft_next_cursor']}", headers=_h(key_a))
    assert r.status_code == 400 and r.json_body["error"]["param"] == "after"
    # Nor does an entry id of another team's anchor a page.
    r = api.http.get(f"/v1/admin/audit?after={page['data'][0]['id']}", headers=_h(key_a))
    assert r.status_code == 200 and r.json_body["data"] == []


def test_the_log_pages_and_filters(api, admin_headers, make_team):
    team_id, _ = make_team("audit-pages")
    made = [api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers).json_body["id"] for _ in range(4)]
    seen, after = [], None
    while True:
        q = f"team_id={team_id}&action=key.created&limit=2" + (f"&after={after}" if after else "")
        page = api.http.get(f"/v1/admin/audit?{q}", headers=admin_headers).json_body
        seen += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [e["target"] for e in seen] == [f"key:{k}" for k in reversed(made)] + \
        [e["target"] for e in seen[len(made):]]          # newest first (make_team's own key last)
    assert len(seen) == len(made) + 1
    assert {e["action"] for e in _entries(api, admin_headers, team_id, action="key.")} == {"key.created"}
    assert _entries(api, admin_headers, team_id, target=f"key:{made[0]}")[0]["target"] == f"key:{made[0]}"
    assert _entries(api, admin_headers, team_id, actor="nobody") == []
    assert _entries(api, admin_headers, team_id, until=int(time.time()) - 3600) == []
    assert len(_entries(api, admin_headers, team_id, since=int(time.time()) - 3600)) == len(made) + 2
    for q, param in [("limit=0", "limit"), ("since=soon", "since"), ("until=-1", "until"), ("after=rftc1.%25", "after"),
                     ("team_id=" + "t" * 3000, "team_id")]:
        r = api.http.get(f"/v1/admin/audit?{q}", headers=admin_headers)
        assert r.status_code == 400 and r.json_body["error"]["param"] == param, (q, r.json_body)


def test_each_entry_is_an_outbound_event(api, admin_headers, make_team):
    team_id, _ = make_team("audit-events")
    key = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers).json_body
    entry = [e for e in _entries(api, admin_headers, team_id) if e["target"] == f"key:{key['id']}"][0]
    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=f"{outbox.bus_name()}-audit-tap")["QueueUrl"]
    end = time.monotonic() + 90      # the tap holds every earlier test's entries too: read until this one
    while time.monotonic() < end:
        for msg in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            body = json.loads(msg["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])
            if body["detail-type"] == audit.DETAIL_TYPE and body["detail"]["id"] == entry["id"]:
                detail = body["detail"]
                assert detail["team_id"] == team_id and detail["action"] == "key.created"
                assert detail["event_id"] == f"evt-{entry['id']}"
                return
    raise AssertionError("the entry's event was not seen on the bus")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["since", "until", "limit", "after", "action", "actor", "target", "team_id"]),
       value=st.one_of(st.integers(min_value=-10 ** 40, max_value=10 ** 40).map(str),
                       st.text(max_size=60), st.text(min_size=2000, max_size=2100), st.just("rftc1.e30")))
def test_any_query_value_is_an_answer_or_a_400_naming_it(api, admin_headers, name, value):
    r = api.http.get(f"/v1/admin/audit?{urllib.parse.urlencode({name: value})}", headers=admin_headers)
    assert r.status_code in (200, 400), (name, value, r.status_code, r.body[:300])
    if r.status_code == 400:
        assert r.json_body["error"]["param"] == name


def test_the_helpers_for_settings_write_the_row_and_its_entry_together(make_team, ddb_faults):
    """audit.save / audit.delete: what budgets.set_budget and prices.set_override/delete_override call
    (the money path's owner wires them): the row and its entry in one transaction, or neither."""
    from chalicelib.errors import ServiceUnavailable
    from chalicelib.store.models import Budget, PriceOverride

    team_id, _ = make_team("audit-helpers")
    fields = ("limit_micro", "period", "thresholds")
    budget = Budget(team_id, limit_micro=5_000_000, period="monthly", thresholds=[0.5, 1.0], updated_at=1)
    ddb_faults.configure(rules=[{"operation": "TransactWriteItems", "table": "-audit_log", "rate": 1.0,
                                 "error": "ThrottlingException"}])
    with pytest.raises(ServiceUnavailable):
        audit.save(budget, action="budget.set", target=f"team:{team_id}", team_id=team_id, fields=fields,
                   what="budget set")
    ddb_faults.reset()
    budget_entries = lambda: [e for e in _all_entries_of(team_id) if e.action == "budget.set"]  # noqa: E731 - a query
    assert Budget.count(team_id, consistent_read=True) == 0 and budget_entries() == []

    with audit.acting(None, "req-1"):
        entry = audit.save(budget, action="budget.set", target=f"team:{team_id}", team_id=team_id, fields=fields,
                           what="budget set")
    assert Budget.get(team_id, consistent_read=True).limit_micro == 5_000_000
    assert [(e.action, e.actor, e.request_id, e.before, e.after["limit_micro"]) for e in budget_entries()] == \
        [("budget.set", "system", "req-1", None, 5_000_000)] and entry.entry_id

    model = f"audit-model-{team_id[-8:]}"
    price = PriceOverride(model, input="1", output="2", cached_input="1", updated_at=1)
    price.save()
    audit.delete(price, action="price.deleted", target=f"price:{model}", team_id=None,
                 fields=("input", "output", "cached_input"), what="price delete")
    assert PriceOverride.count(model, consistent_read=True) == 0
    found = [e for e in AuditEntry.query(audit.LOG, consistent_read=True, scan_index_forward=False, limit=50)
             if e.target == f"price:{model}"]
    assert [(e.action, e.team_id, e.before["output"]) for e in found] == [("price.deleted", None, "2")]


def test_a_transaction_applied_whose_answer_was_lost_is_one_change_and_one_entry(api, admin_headers, make_team,
                                                                                    ddb_faults):
    """The fault layer holds the key's transaction past the client's read timeout (an unknown outcome),
    so it is sent again while the first is still held; then both go on. The first applies; the repeat
    finds its own entry and is taken as done: one key, one entry, a 201."""
    from concurrent.futures import ThreadPoolExecutor

    team_id, _ = make_team("audit-lost-answer")
    ddb_faults.configure(tx_delay_ms=120_000)
    with ThreadPoolExecutor(1) as pool:
        issued = pool.submit(api.http.post, f"/v1/admin/teams/{team_id}/keys", headers=admin_headers)
        assert ddb_faults.wait_for("TransactWriteItems", 2, timeout=60)   # the first is held; its repeat too
        ddb_faults.reset()                                                # both go on
        r = issued.result(timeout=60)
    assert r.status_code == 201, r.json_body
    assert len(list(ApiKey.by_team.query(team_id))) == 2                  # make_team's and this one
    created = [e for e in _all_entries_of(team_id) if e.action == "key.created"]
    assert len(created) == 2 and sum(e.target == f"key:{r.json_body['id']}" for e in created) == 1
