"""Issue #23, "odd input": the new routes (evals, runs, output items, watch, rollouts, checkpoints,
events, aliases, graders/validate, console session, the data plane) under property-based inputs with
Unicode digits, lone surrogates, 38+ and 401-digit numbers, 1e400 and key-like path segments: a 4xx
in the OpenAI envelope, never a 500 (conftest fails any test during which the app answered one).
Example counts are bounded so the file runs in about a minute."""
from __future__ import annotations

import base64
import json
import time
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_data import arithmetic_rows, jsonl

from chalicelib import deadline
from chalicelib.errors import InvalidRequest
from chalicelib.platform import console_sessions
from chalicelib.spend import ledger
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import (
    Alias,
    Checkpoint,
    EvalDefinition,
    EvalOutputItem,
    File,
    Job,
    JobEvent,
    RolloutWindow,
)
from local.harness import ADMIN_KEY

FEW = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
UNICODE_DIGITS = "²³¹٣٤۵५০੬௭౮൯๙០᠑０９𝟘"
SURROGATES = ["\ud800", "\udfff", "\udc80"]
odd_text = st.text(alphabet=st.sampled_from(list("0123456789-._e+ " + UNICODE_DIGITS) + SURROGATES), max_size=50)
number_text = st.one_of(st.just("1" * 38 + "." + "1" * 38), st.just("9" * 39), st.just("0." + "0" * 37 + "1" * 5),
                        st.text(alphabet=st.sampled_from(list("0123456789.-") + ["²", "٣"]), min_size=1, max_size=80))
# JSON number literals a parser must refuse or bound: 401-digit ints, 1e400, 76 significant digits.
odd_numbers = st.sampled_from(["1" * 401, "-" + "9" * 401, "1e400", "-1e400", "1" * 39, "1" * 38 + "." + "1" * 38,
                               "5e-324", "true", '"²"', '"٣"', "1e38", "0", "0.5", "-1"])
EQ = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
      "reference": "{{item.reference_answer}}", "operation": "eq"}


def _json(api, method, path, key, raw: str | None = None, **headers):
    hdrs = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers}
    return getattr(api.http, method)(path, headers=hdrs, **({"body": raw} if raw is not None else {}))


def _client_error(r, param=None):
    assert 400 <= r.status_code < 500, (r.status_code, r.body[:300])
    error = json.loads(r.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def world(api, stack):
    """One team with a file, a job, an eval and a finished run, and an alias row (written as the
    registry writes it: this module tests parsing, not promotion)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    team = json.loads(api.http.post("/v1/admin/teams", headers=admin, body=json.dumps({"name": "odd"})).body)
    key = json.loads(api.http.post(f"/v1/admin/teams/{team['id']}/keys", headers=admin).body)["key"]
    import openai
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, extra_body={
        "method": {"type": "reinforcement", "reinforcement": {"grader": EQ}}})
    ev = client.evals.create(name="odd", data_source_config={"type": "custom", "item_schema": {
        "type": "object", "properties": {"reference_answer": {"type": "string"}}}}, testing_criteria=[EQ])
    rows = [{"item": {"reference_answer": "1"}, "sample": {"output_text": "1", "model": "m"}}] * 2
    run = client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content",
                                                                                       "content": rows}})
    Alias(team["id"], "odd-alias", model_id="openai.gpt-oss-20b", base_model="openai.gpt-oss-20b", version=1,
          updated_at=int(time.time())).save()
    return {"team": team["id"], "key": key, "file": f.id, "job": job.id, "eval": ev.id, "run": run.id}


def _cursor(key: dict) -> str:
    raw = json.dumps(key, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return pagination.CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _q(value: str) -> str:
    return urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")


# ---- cursors (L1, L2): lone surrogates and 76-digit numbers -------------------------------------

LISTS = [  # (path, model, index, hash value of the partition listed)
    ("/v1/fine_tuning/jobs", Job, "by_created", lambda w: w["team"]),
    ("/v1/files", File, "by_created", lambda w: w["team"]),
    ("/v1/evals", EvalDefinition, "by_created", lambda w: w["team"]),
    ("/v1/fine_tuning/jobs/{job}/events", JobEvent, None, lambda w: w["job"]),
    ("/v1/fine_tuning/jobs/{job}/checkpoints", Checkpoint, None, lambda w: w["job"]),
    ("/v1/fine_tuning/jobs/{job}/watch", RolloutWindow, None, lambda w: f"{w['team']}#{w['job']}"),
    ("/v1/evals/{eval}/runs/{run}/output_items", EvalOutputItem, None, lambda w: w["run"]),
]


def _key_of(model, index, hash_value, *, text, number):
    """A cursor key with exactly the model's key names and types: the hash key as given, every
    other S value `text`, every N value `number`."""
    meta = model._get_connection().get_meta_table()
    hash_name = meta.hash_keyname if index is None else meta.get_index_hash_keyname(index)
    attrs = pagination._by_dynamo_name(model)
    key = {}
    for name in pagination.key_names(model, index):
        is_number = type(attrs[name][1]).__name__ == "NumberAttribute"
        key[name] = {"N": number} if is_number else {"S": hash_value if name == hash_name else text}
    return key


@pytest.mark.parametrize("path,model,index,partition", LISTS, ids=[p for p, *_ in LISTS])
def test_cursors_with_surrogates_or_76_digit_numbers_are_400(api, world, path, model, index, partition):
    url = path.format(**world)
    keys = [_key_of(model, index, "\ud800", text="x", number="1")]            # as the attack sent it
    inner = _key_of(model, index, partition(world), text="\udfff", number="1")
    keys += [inner] if any(v.get("S") == "\udfff" for v in inner.values()) else []   # in a range key
    huge = _key_of(model, index, partition(world), text="x", number="1" * 38 + "." + "1" * 38)
    keys += [huge] if any("N" in v for v in huge.values()) else []           # a key with a number in it
    for key in keys:
        r = _json(api, "get", f"{url}?after={_q(_cursor(key))}", world["key"])
        _client_error(r, "after")


@FEW
@given(st.sampled_from(LISTS), odd_text, number_text, st.booleans())
def test_any_cursor_is_400_or_a_key_dynamodb_accepts(world, case, text, number, own_partition):
    """decode_cursor either refuses a cursor or returns a start key DynamoDB takes as it is."""
    _, model, index, partition = case
    hash_value = partition(world) if own_partition else text
    key = _key_of(model, index, hash_value, text=text or "x", number=number)
    try:
        start = pagination.decode_cursor(_cursor(key), model, hash_value=partition(world), index=index)
    except InvalidRequest:
        return
    pagination.query(model, partition(world), limit=1, start=start, index=index)    # no ValidationException


# ---- ids, windows and versions written with other scripts' digits (L3, L4, L8) --------------------

@FEW
@given(odd_text)
def test_after_and_limits_in_any_alphabet_are_answered(api, world, text):
    q = _q(text)
    for path in (f"/v1/fine_tuning/jobs/{world['job']}/watch?after={q}",
                 (f"/v1/evals/{world['eval']}/runs/{world['run']}/output_items?after=outputitem_"
                  f"{world['run'][len('evalrun_'):]}_{q}"),
                 f"/v1/fine_tuning/jobs/{world['job']}/rollouts?window={q}",
                 f"/v1/fine_tuning/jobs?limit={q}", f"/v1/files?after={q}", f"/v1/evals?after={q}",
                 f"/v1/fine_tuning/jobs/{world['job']}/events?after={q}",
                 f"/v1/fine_tuning/jobs/{world['job']}/checkpoints?after={q}",
                 f"/v1/evals/{world['eval']}/runs?after={q}", f"/v1/models/aliases/{q or 'x'}/history"):
        r = _json(api, "get", path, world["key"])
        assert r.status_code in (200, 400, 404), (path, r.status_code, r.body[:300])


@pytest.mark.parametrize("version", ["²", "٣", "１", "9" * 12])
def test_alias_versions_in_other_scripts_are_404(api, world, version):
    body = json.dumps({"model": f"odd-alias@{version}", "messages": [{"role": "user", "content": "x"}]})
    _client_error(_json(api, "post", "/v1/chat/completions", world["key"], body), "model")
    body = json.dumps({"model": f"odd-alias@{version}", "input": "x"})
    _client_error(_json(api, "post", "/v1/responses", world["key"], body), "model")


def test_watch_after_with_a_unicode_digit_is_400(api, world):
    _client_error(_json(api, "get", f"/v1/fine_tuning/jobs/{world['job']}/watch?after={_q('²')}", world["key"]),
                  "after")


# ---- numbers in bodies: 401 digits, 1e400 (L5, L6, L7, H1's first half) -------------------------

N = "@N@"          # where the raw number literal goes: json.dumps cannot write 1e400 or a 401-digit int
MSG = [{"role": "user", "content": "{{sample.output_text}}"}]


def _with(body: dict, number: str) -> str:
    return json.dumps(body).replace(f'"{N}"', number)


def _criterion(number: str, threshold: float | None = None) -> str:
    body = {"name": "n", "data_source_config": {"type": "custom", "item_schema": {"type": "object"}},
            "testing_criteria": [{"type": "score_model", "name": "j", "model": "openai.gpt-oss-20b", "range": [0, N],
                                  "input": MSG, "pass_threshold": N if threshold is None else threshold}]}
    return _with(body, number)


@FEW
@given(odd_numbers, st.sampled_from(["evals", "validate", "run", "chat", "responses", "job", "nova"]))
def test_odd_numbers_in_bodies_are_4xx_or_served(api, world, number, where):
    judge = {"type": "score_model", "name": "j", "model": "openai.gpt-oss-20b", "range": [N, 2], "input": MSG}
    hp = "n_epochs" if where == "job" else "max_prompt_length"
    path, body = {
        "evals": ("/v1/evals", None),
        "validate": ("/v1/fine_tuning/alpha/graders/validate", {"grader": judge}),
        "run": (f"/v1/evals/{world['eval']}/runs", {"data_source": {
            "type": "completions", "model": "openai.gpt-oss-20b",
            "source": {"type": "file_content", "content": [{"item": {"reference_answer": "1"}}]},
            "sampling_params": {"temperature": N, "seed": N}}}),
        "chat": ("/v1/chat/completions", {"model": "openai.gpt-oss-20b", "max_tokens": N, "seed": N,
                                          "messages": [{"role": "user", "content": "x"}]}),
        "responses": ("/v1/responses", {"model": "openai.gpt-oss-20b", "input": "x", "max_output_tokens": N,
                                        "temperature": N}),
        "job": ("/v1/fine_tuning/jobs", {"model": "openai.gpt-oss-20b", "training_file": world["file"],
                                         "method": {"type": "reinforcement", "reinforcement": {
                                             "grader": EQ, "hyperparameters": {hp: N, "batch_size": N}}}}),
    }.get(where) or ("/v1/fine_tuning/jobs", {"model": "amazon.nova-2-lite-v1:0:256k", "training_file": world["file"],
                                              "method": {"type": "reinforcement", "reinforcement": {
                                                  "grader": EQ, "hyperparameters": {hp: N, "batch_size": N}}}})
    r = _json(api, "post", path, world["key"], _criterion(number) if body is None else _with(body, number))
    assert r.status_code in (200, 201, 400, 404), (where, number[:20], r.status_code, r.body[:300])
    json.loads(r.body)      # never `Infinity` or anything else that is not JSON


@pytest.mark.parametrize("field,value", [("max_tokens", 12345678901234567890123456789012345678901),
                                         ("max_completion_tokens", 10 ** 7), ("n", 129), ("seed", 2 ** 63),
                                         ("top_logprobs", 21), ("temperature", 10 ** 400)])
def test_chat_numbers_out_of_range_are_400_naming_the_field_before_any_hold(api, world, field, value):
    before = len(ledger.entries(world["team"]))
    body = {"model": "openai.gpt-oss-20b", "messages": [{"role": "user", "content": "x"}], field: value}
    _client_error(_json(api, "post", "/v1/chat/completions", world["key"], json.dumps(body)), field)
    assert len(ledger.entries(world["team"])) == before


def test_responses_huge_max_output_tokens_is_400_and_not_on_the_ledger(api, world):
    before = len(ledger.entries(world["team"]))
    body = {"model": "openai.gpt-oss-20b", "input": "x", "max_output_tokens": 10 ** 40}
    _client_error(_json(api, "post", "/v1/responses", world["key"], json.dumps(body)), "max_output_tokens")
    assert len(ledger.entries(world["team"])) == before


def test_infinity_in_a_range_is_refused_so_lists_stay_json(api, world):
    _client_error(_json(api, "post", "/v1/evals", world["key"], _criterion("1e400", threshold=0.5)))
    json.loads(_json(api, "get", "/v1/evals", world["key"]).body)


# ---- the console cookie (M5) and its deadline (L10) -----------------------------------------------

cookie_part = st.text(alphabet=st.sampled_from(list("abcAB09é€Ω\u00ff=_-") + SURROGATES), max_size=20)


@FEW
@given(cookie_part, cookie_part, cookie_part)
def test_any_console_cookie_is_401_not_500(api, world, version, body, signature):
    value = f"{version or 'v1'}.{body}.{signature}"       # the token's shape: version.body.signature
    r = api.http.get("/v1/me", headers={"Cookie": f"{console_sessions.COOKIE}={value}"})
    _client_error(r)


def test_a_non_ascii_cookie_is_401_on_both_planes(stack):
    cookie = {"Cookie": f"{console_sessions.COOKIE}=v1.abc.é".encode()}      # UTF-8 bytes on the wire
    assert httpx.get(f"{stack.base_url}/v1/me", headers=cookie, timeout=30).status_code == 401
    for base in (stack.base_url, f"http://127.0.0.1:{stack.dataplane_port}"):
        r = httpx.post(f"{base}/v1/chat/completions", headers=cookie, timeout=30,
                       json={"model": "openai.gpt-oss-20b", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text


def test_cookie_authentication_runs_inside_the_requests_deadline(api, stack, world, ddb_faults, monkeypatch):
    """DynamoDB failing every read: a cookie-authenticated request is a 503, and every DynamoDB call
    its authentication made was given the request's deadline (inside API Gateway's 29 s), on the
    control plane and on the data plane's own port; before, they ran with no deadline (25 s each)."""
    token = httpx.post(f"{stack.base_url}/console/session", json={"key": world["key"]}, timeout=30)
    token = token.headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]
    console_sessions.clear_cache()
    seen = []
    real = dynamo.call

    def spy(op, *, idempotent, what, **kw):
        if what in ("console session", "key lookup"):
            at = deadline._deadline.get()
            seen.append(None if at is None else at - time.monotonic())
        return real(op, idempotent=idempotent, what=what, **kw)

    monkeypatch.setattr(dynamo, "call", spy)
    ddb_faults.configure(rules=[{"operation": "GetItem", "error": "InternalServerError", "rate": 1.0}])
    cookie = {"Cookie": f"{console_sessions.COOKIE}={token}"}
    r = api.http.get("/v1/me", headers=cookie)
    assert r.status_code == 503, r.body[:300]
    r = httpx.post(f"http://127.0.0.1:{stack.dataplane_port}/v1/chat/completions", headers=cookie, timeout=60,
                   json={"model": "openai.gpt-oss-20b", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503, r.text
    assert len(seen) >= 2 and all(s is not None and 0 < s <= deadline.API_GATEWAY_SECONDS for s in seen), seen


# ---- key-like path segments (L12) and the data plane's own port (L13, L14) ---------------------------

def test_route_404s_never_repeat_a_key_pasted_as_an_id(api, world):
    for path in (f"/v1/evals/{world['key']}/runs/x/cancel", f"/v1/evals/{world['key']}",
                 f"/v1/fine_tuning/jobs/{world['key']}", f"/v1/files/{world['key']}",
                 f"/v1/evals/{world['eval']}/runs/{world['key']}"):
        r = _json(api, "post" if path.endswith("cancel") else "get", path, world["key"])
        assert r.status_code == 404 and world["key"] not in r.body.decode() and "rfth_" not in r.body.decode(), r.body


def test_data_plane_port_ignores_caller_supplied_adapter_headers(stack, world):
    forged = "00000000-0000-4000-8000-00000000beef"
    headers = {"Authorization": f"Bearer {world['key']}",
               "x-amzn-request-context": json.dumps({"requestId": forged}),
               "x-amzn-lambda-context": json.dumps({"deadline": time.time() * 1000 + 900_000})}
    body = {"model": "openai.gpt-oss-20b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    direct = httpx.post(f"http://127.0.0.1:{stack.dataplane_port}/v1/chat/completions", headers=headers, json=body,
                        timeout=60)
    assert direct.status_code == 200 and direct.headers["x-request-id"] != forged
    via = httpx.post(f"{stack.base_url}/v1/chat/completions", headers=headers, json=body, timeout=60)
    assert via.status_code == 200 and via.headers["x-request-id"] not in (forged, direct.headers["x-request-id"])


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/chat/completions", 405),
                                                ("POST", "/v1/embeddings", 404), ("GET", "/", 404)])
def test_data_plane_port_answers_unknown_routes_in_the_envelope(stack, method, path, status):
    r = httpx.request(method, f"http://127.0.0.1:{stack.dataplane_port}{path}", timeout=30)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


# ---- Slack URLs (webhook, response_url) ------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://127.0.0.1:1@evil.example.com/services/x",
                                 "https://hooks.slack.com@evil.example.com/services/x",
                                 "https://hooks.slack.com.evil.example.com/services/x",
                                 "https://hooks.slack.com:8443/services/x", "http://127.0.0.1:9\\@evil/x"])
def test_webhook_urls_are_compared_parsed_not_as_strings(api, world, url):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    r = api.http.put(f"/v1/admin/teams/{world['team']}/slack", headers=admin, body=json.dumps({"webhook_url": url}))
    _client_error(r, "webhook_url")


# ---- an item reference with another script's digit (L8) ---------------------------------------------

def test_an_item_reference_with_a_unicode_digit_is_the_items_invalid_variable_error(stack, world, bedrock):
    """The eval worker walked `item.messages.²` with int('²') and crashed (the run stayed in_progress,
    its message redelivered): now each item gets invalid_variable_error and the run ends."""
    import openai
    from helpers import wait_run

    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=world["key"], max_retries=0)
    item = {"reference_answer": "1", "messages": [{"role": "user", "content": "x"}]}
    run = client.evals.runs.create(world["eval"], data_source={
        "type": "completions", "model": "openai.gpt-oss-20b",
        "source": {"type": "file_content", "content": [{"item": item}]},
        "input_messages": {"type": "item_reference", "item_reference": "item.messages.²"},
        "sampling_params": {"max_completion_tokens": 8}})
    done = wait_run(client, world["eval"], run.id)
    assert done.status in ("completed", "failed") and done.result_counts.errored == 1, done
    items = client.evals.runs.output_items.list(run.id, eval_id=world["eval"]).data
    assert [i.sample.error.code for i in items] == ["invalid_variable_error"]
