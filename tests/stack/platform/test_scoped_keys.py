"""Scoped keys (issue #29): name, owner, expiry, models, role; rotation; last use to the day.

The role is enforced where routes authenticate (api/http.py), by route shape: the class test walks
the app's whole route table with a `read` and an `inference` key."""
import json
import re
import time
from datetime import UTC, datetime

import openai
import pytest

from chalicelib.domain import keys, scopes

BASE = "openai.gpt-oss-20b"
OTHER = "openai.gpt-oss-120b"


def _issue(api, admin_headers, team_id, **spec):
    r = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers, body=json.dumps(spec))
    assert r.status_code == 201, r.json_body
    return r.json_body


def _h(key):
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def _listed(api, admin_headers, team_id):
    return {k["id"]: k for k in api.http.get(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers).json_body["data"]}


def test_a_key_has_a_name_owner_role_models_and_expiry(api, admin_headers, make_team):
    team_id, _ = make_team("scoped")
    until = int(time.time()) + 3600
    key = _issue(api, admin_headers, team_id, name="dashboard", owner="ana@example.com", role="read",
                 models=[BASE, BASE, "support-bot"], expires_at=until)
    assert (key["name"], key["owner"], key["role"], key["models"], key["expires_at"], key["status"]) == \
        ("dashboard", "ana@example.com", "read", [BASE, "support-bot"], until, "active")
    listed = _listed(api, admin_headers, team_id)[key["id"]]
    assert listed["role"] == "read" and listed["last_used"] is None and "key" not in listed
    assert key["key"] not in json.dumps(listed)
    # An empty body is what every key was before: full, any model, no expiry.
    plain = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers).json_body
    assert (plain["role"], plain["models"], plain["expires_at"]) == ("full", None, None)


@pytest.mark.parametrize("body, param", [
    ({"role": "admin"}, "role"), ({"role": 1}, "role"), ({"models": []}, "models"), ({"models": "gpt"}, "models"),
    ({"models": ["x" * 257]}, "models"), ({"models": [""]}, "models"), ({"models": ["m"] * 51}, "models"),
    ({"expires_at": 1}, "expires_at"), ({"expires_at": 10 ** 30}, "expires_at"), ({"expires_at": "soon"}, "expires_at"),
    ({"name": ""}, "name"), ({"colour": "red"}, "colour"),
])
def test_bad_key_specs_are_a_400_naming_the_field(api, admin_headers, make_team, body, param):
    team_id, _ = make_team("scoped-bad")
    r = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers, body=json.dumps(body))
    assert r.status_code == 400, r.json_body
    assert r.json_body["error"]["param"] == param, r.json_body


def _routes():
    """Every route of the app that a team key can reach: (method, path pattern)."""
    from app import app

    out = []
    for path, methods in sorted(app.routes.items()):
        for method, entry in sorted(methods.items()):
            meta = getattr(entry.view_function, "openapi", None)
            if meta and meta["auth"] in ("team", "any"):
                out.append((method, path))
    return out


ROUTES = _routes()


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x-nothing", path)


@pytest.fixture(scope="module")
def scoped(api):
    """A team with a read key and an inference key (module-wide: the route walks are long)."""
    from local.harness import ADMIN_KEY

    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    team = api.http.post("/v1/admin/teams", headers=admin, body=json.dumps({"name": "roles"})).json_body
    return {role: _issue(api, admin, team["id"], role=role)["key"] for role in ("read", "inference")}


def test_the_route_table_is_walked():
    assert len(ROUTES) > 40 and ("POST", "/v1/fine_tuning/jobs") in ROUTES and ("GET", "/v1/models") in ROUTES


@pytest.mark.parametrize("method, path", ROUTES)
@pytest.mark.parametrize("role", ["read", "inference"])
def test_every_route_admits_a_scoped_key_by_its_shape(api, scoped, role, method, path):
    """The class: each route of the table, with a read and an inference key. Refused: a 403 in the
    envelope before the route runs; admitted: anything but that 403 (a 404 for the dummy id, a 400
    for the empty body)."""
    r = getattr(api.http, method.lower())(_concrete(path), headers=_h(scoped[role]), body=b"{}")
    refused = r.status_code == 403 and r.json_body["error"]["code"] == "insufficient_permissions"
    assert refused == (not scopes.allows(role, method, path)), (r.status_code, r.body[:300])
    if role == "read":
        assert refused == (method not in ("GET", "HEAD"))


def test_a_read_key_cannot_create_a_job_a_file_or_a_chat_call(api, scoped, stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=scoped["read"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.files.create(file=("t.jsonl", b'{"messages": []}\n'), purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError):
        client.fine_tuning.jobs.create(model=BASE, training_file="file-x")
    with pytest.raises(openai.PermissionDeniedError):      # the data plane (streaming) refuses it too
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}])
    assert client.models.list().data                          # reading is what it is for


def test_an_inference_key_calls_models_but_cannot_train(api, scoped, bedrock):
    r = api.http.post("/v1/chat/completions", headers=_h(scoped["inference"]),
                      body=json.dumps({"model": BASE, "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 5}))
    assert r.status_code == 200, r.body
    r = api.http.post("/v1/fine_tuning/jobs", headers=_h(scoped["inference"]),
                      body=json.dumps({"model": BASE, "training_file": "file-x"}))
    assert r.status_code == 403 and r.json_body["error"]["code"] == "insufficient_permissions"
    assert scoped["inference"] not in r.body.decode()


def test_an_inference_key_calls_the_data_plane(scoped, stack, bedrock):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=scoped["inference"], max_retries=0)
    assert client.chat.completions.create(model=BASE, max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def test_a_key_limited_to_some_models_sees_no_other(api, admin_headers, make_team):
    team_id, _ = make_team("models-scoped")
    key = _issue(api, admin_headers, team_id, models=[BASE])["key"]
    assert [m["id"] for m in api.http.get("/v1/models", headers=_h(key)).json_body["data"]] == [BASE]
    assert api.http.get(f"/v1/models/{BASE}", headers=_h(key)).status_code == 200
    hidden = api.http.get(f"/v1/models/{OTHER}", headers=_h(key))
    missing = api.http.get("/v1/models/no-such-model", headers=_h(key))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json_body["error"]["code"] == missing.json_body["error"]["code"] == "model_not_found"


def test_the_model_list_is_checked_where_models_are_resolved(make_team, api, admin_headers):
    """inference/targets.priced: what the gateway, eval runs and judges resolve through."""
    from chalicelib.errors import NotFound
    from chalicelib.inference import targets

    team_id, _ = make_team("priced-scoped")
    assert targets.priced(team_id, BASE, allowed=(BASE,))[0].upstream == BASE
    with pytest.raises(NotFound) as err:
        targets.priced(team_id, OTHER, allowed=(BASE,))
    assert err.value.code == "model_not_found" and err.value.param == "model"
    assert targets.priced(team_id, OTHER, allowed=None)[0].upstream == OTHER


def test_a_key_limited_to_one_model_gets_a_404_calling_another(api, admin_headers, make_team, bedrock):
    team_id, _ = make_team("chat-scoped")
    key = _issue(api, admin_headers, team_id, models=[BASE])["key"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    assert api.http.post("/v1/chat/completions", headers=_h(key), body=json.dumps({**body, "model": BASE})
                         ).status_code == 200
    r = api.http.post("/v1/chat/completions", headers=_h(key), body=json.dumps({**body, "model": OTHER}))
    assert r.status_code == 404 and r.json_body["error"]["code"] == "model_not_found"


def _until_past(at: int) -> None:
    """Waits until the clock is past `at` (a state the clock reaches for certain, not a race)."""
    while time.time() <= at:
        time.sleep(0.05)


def test_an_expired_key_is_a_401_even_when_cached(api, admin_headers, make_team):
    team_id, _ = make_team("expiring")
    # Seconds of margin: a loaded machine may take one to answer the issue (an expiry in the past is a 400).
    at = int(time.time()) + 5
    key = _issue(api, admin_headers, team_id, expires_at=at)["key"]
    used = api.http.get("/v1/me", headers=_h(key))                         # verified, now cached
    if time.time() < at:                          # answered before the expiry: it was valid then
        assert used.status_code == 200, used.json_body
    _until_past(at)
    r = api.http.get("/v1/me", headers=_h(key))
    assert r.status_code == 401 and "expired" in r.json_body["error"]["message"]
    assert _listed(api, admin_headers, team_id)[keys.parse_key_id(key)]["status"] == "expired"


def test_a_rotated_key_works_until_its_end_and_not_after(api, admin_headers, make_team):
    team_id, _ = make_team("rotating")
    old = _issue(api, admin_headers, team_id, name="ci", owner="ops", role="inference", models=[BASE])
    r = api.http.post(f"/v1/admin/keys/{old['id']}/rotate", headers=admin_headers,
                      body=json.dumps({"old_key_expires_in": 3600}))
    assert r.status_code == 201, r.json_body
    new = r.json_body
    assert (new["name"], new["owner"], new["role"], new["models"], new["rotated_from"]) == \
        ("ci", "ops", "inference", [BASE], old["id"])
    assert new["previous"]["replaced_by"] == new["id"] and new["previous"]["expires_at"] >= int(time.time()) + 3500
    for key in (old["key"], new["key"]):                       # both work during the overlap
        assert api.http.get("/v1/me", headers=_h(key)).status_code == 200
    again = api.http.post(f"/v1/admin/keys/{old['id']}/rotate", headers=admin_headers)
    assert again.status_code == 409                             # one rotation per key

    # The new key rotated with no overlap: the old one (new["key"]) stops at once, the newest works.
    now = api.http.post(f"/v1/admin/keys/{new['id']}/rotate", headers=admin_headers,
                        body=json.dumps({"old_key_expires_at": int(time.time())}))
    assert now.status_code == 201
    _until_past(now.json_body["previous"]["expires_at"])
    assert api.http.get("/v1/me", headers=_h(new["key"])).status_code == 401
    assert api.http.get("/v1/me", headers=_h(now.json_body["key"])).status_code == 200
    for body, param in [({"old_key_expires_at": 5}, "old_key_expires_at"),
                        ({"old_key_expires_in": -1}, "old_key_expires_in"),
                        ({"old_key_expires_at": int(time.time()) + 9, "old_key_expires_in": 9}, "old_key_expires_at")]:
        bad = api.http.post(f"/v1/admin/keys/{now.json_body['id']}/rotate", headers=admin_headers, body=json.dumps(body))
        assert bad.status_code == 400 and bad.json_body["error"]["param"] == param, bad.json_body
    assert api.http.post("/v1/admin/keys/0123456789abcdef/rotate", headers=admin_headers).status_code == 404


def test_last_use_is_kept_to_the_day_with_one_write_per_key_per_day(api, admin_headers, make_team, ddb_faults):
    """No hot write: five calls of a fresh key try one UpdateItem on the keys table (here refused by
    the fault layer, so each attempt is counted), and a refused stamp never fails the call."""
    team_id, _ = make_team("last-use")
    key = _issue(api, admin_headers, team_id)["key"]
    ddb_faults.configure(rules=[{"operation": "UpdateItem", "table": "-api_keys", "rate": 1.0,
                                 "error": "ProvisionedThroughputExceededException"}])
    for _ in range(5):
        assert api.http.get("/v1/me", headers=_h(key)).status_code == 200
    assert ddb_faults.counters()["faults"] == {"ProvisionedThroughputExceededException": {"UpdateItem": 1}}
    ddb_faults.reset()

    other = _issue(api, admin_headers, team_id)
    for _ in range(3):
        assert api.http.get("/v1/me", headers=_h(other["key"])).status_code == 200
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert _listed(api, admin_headers, team_id)[other["id"]]["last_used"] == today


def test_a_console_session_of_a_read_key_can_look_not_change(api, admin_headers, make_team):
    team_id, _ = make_team("console-read")
    read = _issue(api, admin_headers, team_id, role="read", models=[BASE])["key"]
    r = api.http.post("/console/session", headers={"Content-Type": "application/json"}, body=json.dumps({"key": read}))
    assert r.status_code == 200
    cookie = {"Cookie": r.headers["Set-Cookie"].split(";")[0], "X-CSRF-Token": r.json_body["csrf_token"],
              "Content-Type": "application/json"}
    assert [m["id"] for m in api.http.get("/v1/models", headers=cookie).json_body["data"]] == [BASE]
    refused = api.http.post("/v1/uploads", headers=cookie, body=json.dumps(
        {"bytes": 10, "filename": "x.jsonl", "mime_type": "application/jsonl", "purpose": "fine-tune"}))
    assert refused.status_code == 403 and refused.json_body["error"]["code"] == "insufficient_permissions"
