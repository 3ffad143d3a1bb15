"""Foundation: admin API, team keys, isolation, error envelope."""
import json

import pytest

from chalicelib.domain import keys


def test_admin_creates_team_and_key(api, admin_headers):
    r = api.http.post("/v1/admin/teams", headers=admin_headers, body=json.dumps({"name": "search-ranking"}))
    assert r.status_code == 201
    team = r.json_body
    assert team["name"] == "search-ranking" and team["id"].startswith("team-")

    r = api.http.post(f"/v1/admin/teams/{team['id']}/keys", headers=admin_headers)
    assert r.status_code == 201
    key = r.json_body
    assert key["key"].startswith("rfth_") and key["prefix"].endswith("...")
    assert key["key"] not in json.dumps(api.http.get(f"/v1/admin/teams/{team['id']}/keys",
                                                     headers=admin_headers).json_body)

    me = api.http.get("/v1/me", headers={"Authorization": f"Bearer {key['key']}"})
    assert me.status_code == 200 and me.json_body["team"]["id"] == team["id"]

    listed = api.http.get("/v1/admin/teams", headers=admin_headers).json_body["data"]
    assert team["id"] in [t["id"] for t in listed]
    assert api.http.get(f"/v1/admin/teams/{team['id']}", headers=admin_headers).json_body["name"] == "search-ranking"


def test_only_hash_is_stored(make_team):
    from chalicelib.store.models import ApiKey

    _, key = make_team()
    record = ApiKey.get(keys.parse_key_id(key))
    assert record.key_hash == keys.hash_key(key)
    assert key not in json.dumps(record.attribute_values)


def test_wrong_missing_and_revoked_keys_get_401(api, admin_headers, make_team):
    team_id, key = make_team()
    ok = {"Authorization": f"Bearer {key}"}
    assert api.http.get("/v1/me", headers=ok).status_code == 200

    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {key[:-2]}xx"},
                    {"Authorization": f"Basic {key}"}):
        r = api.http.get("/v1/me", headers=headers)
        assert r.status_code == 401
        assert r.json_body["error"]["type"] == "invalid_request_error"
        assert r.json_body["error"]["code"] == "invalid_api_key"

    key_id = keys.parse_key_id(key)
    assert api.http.delete(f"/v1/admin/keys/{key_id}", headers=admin_headers).status_code == 200
    assert api.http.get("/v1/me", headers=ok).status_code == 401  # the very next request


def test_team_key_cannot_use_admin_api_and_admin_key_is_checked(api, admin_headers, make_team):
    _, key = make_team()
    assert api.http.get("/v1/admin/teams", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert api.http.get("/v1/admin/teams", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_teams_are_isolated(api, admin_headers, make_team):
    team_a, key_a = make_team("a")
    team_b, key_b = make_team("b")
    up = api.http.post("/v1/uploads", headers={"Authorization": f"Bearer {key_a}", "Content-Type": "application/json"},
                       body=json.dumps({"bytes": 10, "filename": "x.jsonl", "mime_type": "application/jsonl",
                                        "purpose": "fine-tune"}))
    assert up.status_code == 200
    other = api.http.post(f"/v1/uploads/{up.json_body['id']}/cancel", headers={"Authorization": f"Bearer {key_b}"})
    assert other.status_code == 404
    assert other.json_body["error"]["message"].startswith("No such upload")
    assert api.http.get("/v1/fine_tuning/jobs/ftjob-nope", headers={"Authorization": f"Bearer {key_b}"}).status_code == 404


def test_bad_admin_input_names_the_field(api, admin_headers):
    cases = [
        ("{not json", "not valid JSON"),
        ("[1,2]", "JSON object"),
        (json.dumps({"name": ""}), "'name'"),
        (json.dumps({"name": "ok", "colour": "red"}), "'colour': unknown field"),
        (json.dumps({"name": 5}), "'name'"),
        (json.dumps({}), "'name': field required"),
    ]
    for body, expected in cases:
        r = api.http.post("/v1/admin/teams", headers=admin_headers, body=body)
        assert r.status_code == 400, body
        assert expected in r.json_body["error"]["message"], (body, r.json_body)


def test_oversized_body_is_413(api, admin_headers):
    r = api.http.post("/v1/admin/teams", headers=admin_headers,
                      body=json.dumps({"name": "x" * (2 * 1024 * 1024)}))
    assert r.status_code == 413
    assert r.json_body["error"]["code"] == "payload_too_large"


def test_unknown_team_and_key_are_404(api, admin_headers):
    assert api.http.get("/v1/admin/teams/team-nope", headers=admin_headers).status_code == 404
    assert api.http.post("/v1/admin/teams/team-nope/keys", headers=admin_headers).status_code == 404
    assert api.http.delete("/v1/admin/keys/0123456789abcdef", headers=admin_headers).status_code == 404


def test_health_reports_dependencies(api):
    r = api.http.get("/health")
    assert r.status_code == 200, r.json_body
    assert r.json_body["status"] == "ok"
    assert set(r.json_body["dependencies"]) == {"dynamodb", "s3", "bedrock"}


@pytest.mark.expects_500
def test_unexpected_errors_become_a_500_envelope_with_a_request_id():
    """The shared route decorator, on a throwaway app whose view fails unexpectedly."""
    from chalice import Blueprint, Chalice
    from chalice.test import Client

    from chalicelib.api.http import route

    bp = Blueprint("tests.broken")

    @route(bp, "/broken", auth=None)
    def broken(req):
        raise RuntimeError("secret detail that must not leak")

    app = Chalice(app_name="broken")
    app.register_blueprint(bp)
    with Client(app) as c:
        r = c.http.get("/broken")
    assert r.status_code == 500
    error = r.json_body["error"]
    assert error["type"] == "server_error" and "secret detail" not in json.dumps(r.json_body)
    assert r.headers["x-request-id"] in error["message"]
