"""Real streaming (issue #14): tokens reach the caller as the local Bedrock produces them, through
the local API Gateway and the data plane (chalicelib/dataplane), metered exactly.

Correctness, not timing: the local Bedrock holds its stream after the first event until the
test releases it, so "the first chunk arrived before the upstream finished" is a fact, not a
race. bench/streaming.py measures the times."""
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
from helpers import http, settled, start_job, wait_for

from chalicelib.domain import budget as budget_rules
from chalicelib.domain import pricing
from chalicelib.spend import budgets, ledger
from local.bedrock_state import DEFAULT_STREAM
from local.harness import ADMIN_KEY

ROOT = Path(__file__).resolve().parents[3]
MODEL = "openai.gpt-oss-20b"
MESSAGES = [{"role": "user", "content": "tell me about streams and rivers"}]
LITELLM_PYTHON = ROOT / ".local" / "litellm-venv" / "bin" / "python"


@pytest.fixture
def upstream(stack, bedrock):
    """Sets the local Bedrock's stream behaviour over its control API; back to the defaults (and
    every held stream released) after the test."""
    url = f"http://127.0.0.1:{stack.ports['bedrock']}/_local"

    def configure(**settings):
        status, body = http("POST", f"{url}/config", None, settings)
        assert status == 200, body
        return body

    yield configure
    http("POST", f"{url}/stream/release", None, {})
    configure(**DEFAULT_STREAM)


def team_with_budget(client, limit_usd="100"):
    team_id = client.get("/me", cast_to=object)["team"]["id"]
    status, body = http("PUT", f"{client.base_url}admin/teams/{team_id}/budget", ADMIN_KEY,
                        {"limit_usd": limit_usd, "period": "monthly", "alert_thresholds": []})
    assert status == 200, body
    return team_id


def period(team_id):
    return budgets.period_item(team_id, budget_rules.period_of(time.time()))


def first_within(iterator, seconds=20.0):
    """The iterator's first item, read in a thread: a stream that waits for its upstream to finish
    fails here, not by hanging until the local Bedrock gives up holding."""
    got = []
    reader = threading.Thread(target=lambda: got.append(next(iterator)), daemon=True)
    reader.start()
    reader.join(seconds)
    assert got, "no chunk reached the caller while the upstream was held"
    return got[0]


def direct_usage(stack, body):
    """What the local Bedrock itself reports for `body`, streamed straight to it with usage."""
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.ports['bedrock']}/v1", api_key="bedrock-api-key-x",
                      max_retries=0)
    if "messages" in body:
        chunks = list(c.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
        return chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens
    events = list(c.responses.create(**body, stream=True))
    return events[-1].response.usage.input_tokens, events[-1].response.usage.output_tokens


# ---- tokens as they come ----------------------------------------------------------------------

def test_the_first_chunk_arrives_while_the_upstream_is_still_held(client, bedrock, upstream, stack):
    upstream(stream_hold=True)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    first = first_within(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    assert bedrock.streams_held == 1                 # the upstream has sent one event and is waiting
    http("POST", f"http://127.0.0.1:{stack.ports['bedrock']}/_local/stream/release", None, {})
    rest = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in rest if c.choices).endswith("rivers")
    assert rest[-1].choices[0].finish_reason == "stop"


def test_a_responses_stream_sends_response_created_before_the_upstream_finishes(client, bedrock, upstream, stack):
    upstream(stream_hold=True)
    events = client.responses.create(model=MODEL, input="tell me about deltas", stream=True)
    first = first_within(iter(events))
    assert first.type == "response.created" and bedrock.streams_held == 1
    http("POST", f"http://127.0.0.1:{stack.ports['bedrock']}/_local/stream/release", None, {})
    rest = list(events)
    kinds = [e.type for e in rest]
    assert kinds[0] == "response.in_progress" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    deltas = "".join(e.delta for e in rest if e.type == "response.output_text.delta")
    assert deltas == rest[-1].response.output_text and rest[-1].response.usage.output_tokens > 0


@pytest.mark.parametrize("options", [{}, {"max_output_tokens": 2},
                                     {"tools": [{"type": "function", "name": "weather", "parameters": {
                                         "type": "object", "properties": {"city": {"type": "string"}}}}],
                                      "tool_choice": "required"}], ids=["text", "incomplete", "tool-call"])
def test_every_responses_event_matches_openais_document(client, bedrock, options):
    import openai_spec as spec

    raw = client.responses.with_raw_response.create(model=MODEL, input="tell me", stream=True, **options)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[5:]) for line in raw.http_response.read().decode().splitlines()
              if line.startswith("data:")]
    for event in events:
        spec.validate("post", "/v1/responses", 200, event, "text/event-stream")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == ("response.incomplete" if options.get("max_output_tokens") else "response.completed")
    assert events[-1]["response"]["usage"]["output_tokens"] > 0


# ---- money --------------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_a_caller_who_leaves_mid_stream_is_billed_exactly_and_no_hold_stays(client, bedrock, upstream, stack,
                                                                            endpoint):
    team_id = team_with_budget(client)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 50} if endpoint == "chat" else \
        {"model": MODEL, "input": "tell me about estuaries", "max_output_tokens": 50}
    upstream(stream_hold=True)
    stream = client.chat.completions.create(**body, stream=True) if endpoint == "chat" else \
        client.responses.create(**body, stream=True)
    first_within(iter(stream))
    assert len(budgets.open_holds(period(team_id))) == 1            # held before the first byte
    stream.close()                                                   # the caller goes away
    http("POST", f"http://127.0.0.1:{stack.ports['bedrock']}/_local/stream/release", None, {})

    (entry,), item = settled(team_id, 1)
    prompt, output = direct_usage(stack, body)
    assert (entry.input_tokens, entry.output_tokens) == (prompt, output)   # the upstream's own usage
    price = pricing.price_for(MODEL)
    assert entry.cost_micro == pricing.cost_of_usage(price, prompt, 0, output) > 0
    assert entry.stream and entry.outcome == "served"
    assert entry.endpoint == ("/chat/completions" if endpoint == "chat" else "/responses")
    assert not budgets.open_holds(item) and item.committed == item.spent == entry.cost_micro


def test_over_budget_is_a_429_before_anything_is_streamed(client, bedrock, upstream):
    team_with_budget(client, limit_usd="0.000001")
    before = len(bedrock.requests)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert err.value.code == "insufficient_quota" and err.value.status_code == 429
    assert err.value.response.headers["content-type"].startswith("application/json")
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.create(model=MODEL, input="x", stream=True)
    assert err.value.code == "insufficient_quota"
    assert len(bedrock.requests) == before                         # nothing reached the upstream


def test_an_upstream_error_mid_stream_ends_the_stream_with_an_error_event(client, bedrock, upstream):
    team_id = team_with_budget(client)
    upstream(stream_error_after=3)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=40)
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received.append(chunk)
    assert "Injected stream failure" in err.value.message and len(received) == 3

    upstream(stream_error_after=None, stream_cut_after=4)          # the connection dropped, no event
    with pytest.raises(openai.APIError) as err:
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=40))
    assert "broke off" in err.value.message and err.value.body["code"] == "upstream_error"

    events = list(client.responses.create(model=MODEL, input="tell me", stream=True, max_output_tokens=40))
    assert events[-1].type == "error" and events[-1].code == "upstream_error"
    assert [e.sequence_number for e in events] == list(range(len(events)))

    entries, item = settled(team_id, 3)
    assert not budgets.open_holds(item) and item.committed == item.spent
    for entry in entries:
        # Charged what was generated (no usage came): the prompt as estimated for the hold, at
        # least one output token per piece received, never more than the hold.
        assert entry.outcome == "error" and entry.status == 502 and 0 < entry.cost_micro <= entry.reserved_micro
        assert entry.input_tokens > 0
    assert sum(e.cost_micro for e in entries) == item.spent


def test_a_non_streamed_call_takes_the_same_path_and_the_chalice_route_still_answers_streams(api, client, bedrock):
    reply = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert reply.headers["x-rft-cost-usd"] and reply.headers["x-request-id"]
    assert reply.parse().usage.completion_tokens > 0
    # Called directly (chalice.test), a streamed call is answered with the whole event stream.
    r = api.http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {client.api_key}",
                                                       "Content-Type": "application/json"},
                      body=json.dumps({"model": MODEL, "messages": MESSAGES, "stream": True}))
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
    assert r.body.decode().rstrip().endswith("data: [DONE]")


def test_errors_from_the_data_plane_keep_the_envelope(client, stack):
    status, body = http("POST", f"{stack.base_url}/v1/chat/completions", "rfth_nope", {"model": MODEL})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = http("POST", f"{stack.base_url}/v1/responses", client.api_key, {"model": MODEL, "stream": "yes",
                                                                                    "input": "x"})
    assert status == 400 and body["error"]["param"] == "stream"
    status, body = http("GET", f"{stack.base_url}/v1/chat/completions", client.api_key)
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


# ---- clients -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alias(stack):
    """A team with a tuned model under an alias, trained on the local Bedrock."""
    status, team = http("POST", f"{stack.base_url}/v1/admin/teams", ADMIN_KEY, {"name": "streaming-clients"})
    assert status == 201, team
    status, key = http("POST", f"{stack.base_url}/v1/admin/teams/{team['id']}/keys", ADMIN_KEY)
    assert status == 201, key
    c = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key["key"], max_retries=0)
    job = start_job(c, suffix="streamer")
    assert wait_for(c, job.id, {"succeeded"}, timeout=60).fine_tuned_model
    return c, "streamer"


def test_the_openai_sdk_streams_chat_and_responses_from_an_alias_and_usage_shows_both(alias, stack):
    c, name = alias
    started = len(ledger.entries(c.get("/me", cast_to=object)["team"]["id"]))
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   c.chat.completions.create(model=name, messages=MESSAGES, stream=True) if ch.choices)
    assert text.endswith("rivers")
    with c.responses.stream(model=name, input="say hi") as events:
        kinds = [e.type for e in events]
        final = events.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed" and final.output_text
    created = [e.type for e in c.responses.create(model=name, input="say hi again", stream=True)]
    assert created[-1] == "response.completed"

    team_id = c.get("/me", cast_to=object)["team"]["id"]
    entries, _ = settled(team_id, started + 3)
    status, report = http("GET", f"{stack.base_url}/v1/usage?group_by=model", c.api_key)
    assert status == 200
    row = next(r for r in report["data"] if r["model"] == name)
    price = pricing.price_for(MODEL)
    assert row["cost_micro"] == sum(pricing.cost_of_usage(price, e.input_tokens, e.cached_tokens, e.output_tokens)
                                    for e in entries if e.model == name)
    assert {e.endpoint for e in entries if e.stream} >= {"/chat/completions", "/responses"}


def test_langchain_chat_openai_streams_from_rft_hub(alias):
    from langchain_openai import ChatOpenAI

    c, name = alias
    llm = ChatOpenAI(model=name, base_url=str(c.base_url), api_key=c.api_key, max_retries=0, stream_usage=True)
    chunks = list(llm.stream("tell me about streams and rivers"))
    assert "".join(ch.content for ch in chunks).endswith("rivers") and len(chunks) > 3
    assert any(ch.usage_metadata and ch.usage_metadata["output_tokens"] > 0 for ch in chunks)


LITELLM_CLIENT = """
import json, os, sys
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import litellm
parts = []
for chunk in litellm.completion(model="openai/" + sys.argv[3], api_base=sys.argv[1], api_key=sys.argv[2], stream=True,
                                messages=[{"role": "user", "content": "tell me about streams and rivers"}]):
    parts.append(chunk.choices[0].delta.content or "")
print(json.dumps({"text": "".join(parts), "chunks": len(parts)}))
"""


def test_litellm_as_a_client_streams_from_rft_hub(alias):
    # LiteLLM needs openai<3 (rft-hub pins 3.x), so it lives in its own virtual environment, which
    # `make test` (and `make bench`) create: `make litellm`.
    assert LITELLM_PYTHON.exists(), "no .local/litellm-venv: run `make litellm` (make test does)"
    c, name = alias
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AWS_ENDPOINT_URL"))}
    result = subprocess.run([str(LITELLM_PYTHON), "-c", LITELLM_CLIENT, str(c.base_url), c.api_key, name],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["text"].endswith("rivers") and out["chunks"] > 3


# ---- deployed: the data plane's function and its streamed integrations --------------------------

def test_the_template_streams_the_two_routes_from_the_data_plane_function():
    """What `make package` merges (tests/deploy/test_deploy.py packages and lints the whole template)."""
    from chalicelib.dataplane import READY_PATH, ROUTES
    from deploy import template

    merged = {"Resources": template.resources("prod")}
    template.add_dataplane(merged, "prod")
    res = merged["Resources"]
    fn = res["DataPlane"]["Properties"]
    assert fn["Handler"] == "chalicelib/dataplane/run.sh" and fn["Timeout"] == 900
    env = fn["Environment"]["Variables"]
    assert env["AWS_LWA_INVOKE_MODE"] == "response_stream" and env["AWS_LAMBDA_EXEC_WRAPPER"] == "/opt/bootstrap"
    assert env["AWS_LWA_READINESS_CHECK_PATH"] == READY_PATH and env["RFT_TABLE_PREFIX"] == "rfthub-prod-"
    assert merged["Parameters"]["LambdaWebAdapterLayerArn"]["Default"] == ""
    assert fn["Layers"][0]["Fn::If"][2] == {"Ref": "LambdaWebAdapterLayerArn"}
    assert fn["Role"] == {"Fn::GetAtt": ["DataPlaneRole", "Arn"]}
    paths = res["RestAPI"]["Properties"]["DefinitionBody"]["paths"]
    assert {(m.upper(), p) for p, methods in paths.items() for m in methods} == set(ROUTES)
    for method, path in ROUTES:
        integration = paths[path][method.lower()]["x-amazon-apigateway-integration"]
        assert integration["responseTransferMode"] == "STREAM" and integration["type"] == "aws_proxy"
        assert "/2021-11-15/functions/${DataPlane.Arn}/response-streaming-invocations" in integration["uri"]["Fn::Sub"]
    assert res["DataPlaneInvokePermission"]["Properties"]["FunctionName"] == {"Ref": "DataPlane"}
    statements = {st["Sid"]: st for st in
                  res["DataPlaneRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]}
    for statement in statements.values():
        assert not (any(a.endswith(":*") for a in statement["Action"]) and "*" in statement["Resource"])
    # It writes only what metering writes: budget slices, the ledger and threshold events; rate-limit
    # slices; and a key's day of last use (issue #29: one UpdateItem per key per day, nothing else there).
    writes = [st for st in statements.values()
              if st["Effect"] == "Allow" and {"dynamodb:PutItem", "dynamodb:UpdateItem"} & set(st["Action"])]
    assert [st["Sid"] for st in writes] == ["Metering", "KeyLastUse"]
    assert sorted(r.rsplit("-", 1)[-1] for r in writes[0]["Resource"]) == ["budget_periods", "ledger", "outbox",
                                                                                 "rate_windows"]
    assert writes[1]["Action"] == ["dynamodb:UpdateItem"] and writes[1]["Resource"] == [
        "arn:aws:dynamodb:*:*:table/rfthub-prod-api_keys"]
