"""PUT /v1/admin/teams/{id}/limits under property-based bodies (issue #29), as the other admin bodies
are fuzzed (test_openapi_fuzz.py, test_odd_input.py): any JSON body is a 200 or a 4xx in the OpenAI
envelope naming the field, never a 500 (conftest fails any test during which the app answered one);
bools, floats, negatives, zero, huge numbers and numbers written as strings are refused naming the
field they were given in."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.inference import ratelimits
from local.harness import ADMIN_KEY

FEW = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
NUMBERS = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")
FIELDS = (*NUMBERS, "key_id", "model")
N = "@N@"          # where a raw number literal goes: json.dumps cannot write 1e400 or a 401-digit int

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10 ** 40), max_value=10 ** 40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), json_values, max_size=4)
bad_numbers = st.one_of(
    st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.integers(max_value=0),
    st.integers(min_value=ratelimits.MAX_LIMIT + 1), st.integers(min_value=1, max_value=10 ** 6).map(str),
    st.text(max_size=5), st.lists(st.integers(min_value=1, max_value=5), max_size=2),
    st.just({"value": 5}))
raw_numbers = st.sampled_from(["1" * 401, "-" + "9" * 401, "1e400", "-1e400", "1e2", "5.0", "5e-324", "1" * 39])


@pytest.fixture(scope="module")
def team(api):
    return json.loads(api.http.post("/v1/admin/teams", headers=ADMIN, body=json.dumps({"name": "limits"})).body)["id"]


def _put(api, team_id: str, raw: str):
    r = api.http.put(f"/v1/admin/teams/{team_id}/limits", headers=ADMIN, body=raw)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.body[:300])
    body = json.loads(r.body)
    if r.status_code != 200:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return r.status_code, body


def _valid(body: dict) -> bool:
    """What the documented rules take (docs/controls.md): known fields, whole numbers from 1 to
    MAX_LIMIT or null, a printable model name, no key_id (none of these keys is the team's)."""
    numbers_ok = all(body.get(n) is None or (type(body[n]) is int and 1 <= body[n] <= ratelimits.MAX_LIMIT)
                     for n in NUMBERS)
    model = body.get("model")
    model_ok = model is None or (isinstance(model, str) and 1 <= len(model) <= 256 and model.isprintable())
    return set(body) <= set(FIELDS) and numbers_ok and model_ok and body.get("key_id") is None


@FEW
@given(bodies)
def test_any_limits_body_is_a_200_or_a_4xx_naming_the_field(api, team, body):
    status, answer = _put(api, team, json.dumps(body))
    assert (status == 200) == _valid(body), (body, answer)
    if status == 200:
        assert answer["object"] == "rate_limit"
        for name in NUMBERS:
            assert answer[name] == body.get(name)
    else:
        assert answer["error"]["param"] in body, answer       # the field at fault, one the body has


@FEW
@given(st.sampled_from(NUMBERS), bad_numbers, st.sampled_from([None, "model"]))
def test_a_bad_number_is_refused_naming_its_field(api, team, name, value, scope):
    body = {name: value, **({"model": "some-model"} if scope else {})}
    status, answer = _put(api, team, json.dumps(body))
    assert status == 400 and answer["error"]["param"] == name, (body, answer)


@FEW
@given(st.sampled_from(NUMBERS), raw_numbers)
def test_a_raw_number_literal_out_of_range_is_refused_naming_its_field(api, team, name, literal):
    status, answer = _put(api, team, json.dumps({name: N}).replace(f'"{N}"', literal))
    assert status == 400 and answer["error"]["param"] in (name, None), answer
    if answer["error"]["param"] is None:             # refused by the JSON parser itself, before the field
        assert "JSON" in answer["error"]["message"] or "number" in answer["error"]["message"], answer


def test_good_limits_are_taken_and_listed(api, team):
    assert _put(api, team, json.dumps({"requests_per_minute": 5, "tokens_per_minute": 100,
                                       "concurrent_requests": ratelimits.MAX_LIMIT}))[0] == 200
    listed = json.loads(api.http.get(f"/v1/admin/teams/{team}/limits", headers=ADMIN).body)["data"]
    assert {(x["scope"], x["requests_per_minute"], x["concurrent_requests"]) for x in listed} >= {
        ("team", 5, ratelimits.MAX_LIMIT)}
    for raw in ("[]", '"x"', "5", "null"):            # not an object: the body itself is refused
        assert _put(api, team, raw)[0] == 400


# ---- the other admin settings of issue #29 whose strings become DynamoDB keys -------------------------

odd_names = st.text(alphabet=st.sampled_from(list("ab-_.@:# ") + ["\ud800", "\udfff", "\x00", "²", "é"]),
                    min_size=0, max_size=70)


@FEW
@given(odd_names)
def test_any_guardrail_alias_is_taken_or_a_4xx(api, team, alias):
    body = json.dumps({"guardrail_identifier": "abc123", "guardrail_version": "1", "alias": alias})
    r = api.http.put(f"/v1/admin/teams/{team}/guardrails", headers=ADMIN, body=body)
    assert r.status_code == 200 or (r.status_code == 400 and json.loads(r.body)["error"]["param"] == "alias"), \
        (r.status_code, r.body[:300])
    import urllib.parse
    query = urllib.parse.quote(alias.encode("utf-8", "surrogatepass"), safe="")
    r = api.http.delete(f"/v1/admin/teams/{team}/guardrails?alias={query}", headers=ADMIN)
    assert r.status_code in (200, 400, 404), (r.status_code, r.body[:300])
