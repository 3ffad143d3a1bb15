"""Bedrock Guardrails (issue #29): the local Bedrock's ApplyGuardrail (held to botocore's model), the
admin's attachments (audited), and the checks the gateway makes (inference/guardrails.py)."""
import json

import pytest
from helpers import http

from chalicelib.adapters import bedrock_native
from chalicelib.errors import NotFound
from chalicelib.inference import guardrails
from chalicelib.store.models import AuditEntry
from local import bedrock_native as local_native


@pytest.fixture
def make_guardrail(stack):
    def make(**definition):
        status, body = http("POST", f"http://127.0.0.1:{stack.bedrock.port}/_local/guardrails", body=definition)
        assert status == 201, body
        return body
    return make


def _calls(stack):
    return http("GET", f"http://127.0.0.1:{stack.bedrock.port}/_local/guardrails")[1]["calls"]


def _valid_output(answer: dict) -> None:
    """The answer fits botocore's ApplyGuardrail output shape (members, types, enums, required)."""
    problems: list[str] = []
    local_native.validate_shape(local_native.operation_model("bedrock-runtime", "ApplyGuardrail").output_shape,
                                answer, "", problems)
    assert problems == []


def test_apply_guardrail_blocks_masks_and_counts_units(stack, make_guardrail):
    g = make_guardrail(blocked_words=["launch codes"], pii=[{"type": "EMAIL", "action": "ANONYMIZE"}],
                       regexes=[{"name": "ticket", "pattern": r"TCK-\d+", "action": "ANONYMIZE"}],
                       blocked_input_messaging="Not here.")
    blocked = bedrock_native.apply_guardrail(g["guardrailId"], "1", "INPUT", ["Give me the Launch Codes"], 10)
    _valid_output(blocked)
    assert blocked["action"] == "GUARDRAIL_INTERVENED" and blocked["outputs"] == [{"text": "Not here."}]
    assert blocked["assessments"][0]["wordPolicy"]["customWords"][0]["action"] == "BLOCKED"
    masked = bedrock_native.apply_guardrail(g["guardrailArn"], "DRAFT", "OUTPUT",
                                            ["Mail ana@example.com about TCK-42" + "." * 1000], 10)
    _valid_output(masked)
    assert masked["action"] == "GUARDRAIL_INTERVENED"
    assert masked["outputs"][0]["text"].startswith("Mail {EMAIL} about {ticket}.")
    assert masked["usage"]["sensitiveInformationPolicyUnits"] == 2          # 1,034 characters: two text units
    clean = bedrock_native.apply_guardrail(g["guardrailId"], "1", "INPUT", ["hello"], 10)
    _valid_output(clean)
    assert clean["action"] == "NONE" and clean["outputs"] == []


@pytest.mark.parametrize("identifier, version", [
    ("UPPER", "1"), ("abc", "0"), ("abc", "draft"), ("abc", "123456789"), ("", "1"), ("abc", " 1")])
def test_apply_guardrail_is_as_strict_as_botocores_model(stack, make_guardrail, identifier, version):
    from chalicelib.adapters.bedrock import BedrockRejected
    with pytest.raises(BedrockRejected):
        bedrock_native.apply_guardrail(identifier, version, "INPUT", ["x"], 10)
    ident = make_guardrail()["guardrailId"]
    with pytest.raises(BedrockRejected):     # an unknown source: botocore or the server says no
        bedrock_native.apply_guardrail(ident, "1", "SIDEWAYS", ["x"], 10)
    with pytest.raises(NotFound):
        bedrock_native.apply_guardrail("nosuchguardrail", "1", "INPUT", ["x"], 10)
    with pytest.raises(NotFound):
        bedrock_native.apply_guardrail(ident, "2", "INPUT", ["x"], 10)


def test_the_admin_attaches_a_guardrail_to_a_team_or_an_alias(api, admin_headers, make_team, make_guardrail):
    team_id, _ = make_team("guarded")
    g = make_guardrail(blocked_words=["forbidden"])
    url = f"/v1/admin/teams/{team_id}/guardrails"
    for body, param in [({"guardrail_identifier": "Bad Id", "guardrail_version": "1"}, "guardrail_identifier"),
                        ({"guardrail_identifier": "abc", "guardrail_version": "0"}, "guardrail_version"),
                        ({"guardrail_identifier": "abc"}, "guardrail_version"),
                        ({"guardrail_identifier": "abc", "guardrail_version": "1", "x": 1}, "x")]:
        r = api.http.put(url, headers=admin_headers, body=json.dumps(body))
        assert r.status_code == 400 and r.json_body["error"]["param"] == param, r.json_body
    r = api.http.put(url, headers=admin_headers, body=json.dumps({"guardrail_identifier": g["guardrailId"],
                                                                 "guardrail_version": "1"}))
    assert r.status_code == 200 and r.json_body["alias"] is None
    r = api.http.put(url, headers=admin_headers, body=json.dumps({"guardrail_identifier": g["guardrailArn"],
                                                                 "guardrail_version": "DRAFT", "alias": "bot"}))
    assert r.status_code == 200 and r.json_body["alias"] == "bot"
    listed = api.http.get(url, headers=admin_headers).json_body["data"]
    assert {(a["alias"], a["guardrail_version"]) for a in listed} == {(None, "1"), ("bot", "DRAFT")}
    assert guardrails.for_call(team_id, "bot").scope == "alias:bot"          # the alias's wins
    assert guardrails.for_call(team_id, "other").scope == "team"
    assert api.http.delete(f"{url}?alias=bot", headers=admin_headers).status_code == 200
    assert api.http.delete(f"{url}?alias=bot", headers=admin_headers).status_code == 404
    assert api.http.put("/v1/admin/teams/team-nope/guardrails", headers=admin_headers,
                        body=json.dumps({"guardrail_identifier": "abc", "guardrail_version": "1"})).status_code == 404
    acts = sorted(e.action for e in AuditEntry.query("audit", consistent_read=True) if e.team_id == team_id
                  and e.action.startswith("guardrail."))
    assert acts == ["guardrail.attached", "guardrail.attached", "guardrail.detached"]


def test_a_blocked_prompt_is_a_400_content_filter_and_priced(make_team, make_guardrail, stack):
    team_id, _ = make_team("guard-input")
    g = make_guardrail(blocked_words=["exploit"], pii=[{"type": "PHONE", "action": "BLOCK"}])
    guardrails.attach(team_id, g["guardrailId"], "1", None, 1)
    body = {"model": "m", "messages": [{"role": "system", "content": "be nice"},
                                       {"role": "user", "content": [{"type": "text", "text": "write an EXPLOIT"}]}]}
    verdict = guardrails.check_input(team_id, None, body, "/v1/chat/completions")
    assert verdict.blocked and verdict.intervened
    assert verdict.cost_micro == 200     # 2 blocks: 2 PII units at $0.10 per 1,000 (word units are free)
    err = guardrails.blocked_error(verdict)
    assert (err.status, err.code, err.param) == (400, "content_filter", "messages")
    assert _calls(stack)[-1]["texts"] == ["be nice", "write an EXPLOIT"]
    fine = guardrails.check_input(team_id, None, {"input": "hello", "instructions": "hi"}, "/v1/responses")
    assert not fine.intervened and fine.cost_micro == 200
    other, _ = make_team("unguarded")
    assert guardrails.check_input(other, None, body, "/v1/chat/completions") is None


def test_an_output_is_masked_and_a_stream_stops_in_its_middle(make_team, make_guardrail):
    team_id, _ = make_team("guard-output")
    g = make_guardrail(blocked_words=["secret-sauce"], pii=[{"type": "EMAIL", "action": "ANONYMIZE"}])
    guardrails.attach(team_id, g["guardrailId"], "1", None, 1)
    masked = guardrails.check_output(team_id, None, "write to bob@example.com")
    assert masked.intervened and not masked.blocked and masked.texts == ["write to {EMAIL}"]

    guard = guardrails.OutputGuard(team_id, None, chunk_chars=50)
    first = "word " * 12                                     # 60 characters: one chunk of 50 is checked
    sent = guard.feed(first)
    assert sent == first[:50] and not guard.blocked and guard.checks == 1
    sent = guard.feed("ok then the secret-sauce is " + "more " * 20)
    assert sent == "" and guard.blocked                       # the chunk holding the word is never sent
    assert guard.feed("anything") == "" and guard.finish() == ""
    assert guard.cost_micro == 2 * 100 and guard.checks == 2
    tail = guardrails.OutputGuard(team_id, None, chunk_chars=50)
    assert tail.feed("short, mail me at a@b.co") == "" and tail.finish() == "short, mail me at {EMAIL}"


def test_an_attached_guardrail_bedrock_lacks_is_rft_hubs_error_not_the_callers(make_team):
    from chalicelib.errors import UpstreamError

    team_id, _ = make_team("guard-missing")
    guardrails.attach(team_id, "nosuchguardrail", "1", None, 1)
    with pytest.raises(UpstreamError) as err:
        guardrails.check_input(team_id, None, {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    assert err.value.status == 502 and err.value.code == "guardrail_not_found"


# ---- through the gateway: ready for the lead's wiring (inference/gateway.py and stream.py call the
# checks); strict xfail until then, so the marker must go when they pass. ------------------------------

MODEL = "openai.gpt-oss-120b"


@pytest.fixture
def guarded(stack, make_team, make_guardrail, bedrock):
    """A team whose guardrail blocks 'launch codes' and masks e-mail addresses, its openai client,
    and a way to make the model answer a given text (the local Bedrock's model policy)."""
    import openai
    from flask import Flask, jsonify, request

    from local import servers

    team_id, key = make_team("guarded-gateway")
    g = make_guardrail(blocked_words=["launch codes"], pii=[{"type": "EMAIL", "action": "ANONYMIZE"}])
    guardrails.attach(team_id, g["guardrailId"], "1", None, 1)
    answer = {"text": "ok"}
    app = Flask("guardrail-model-policy")

    @app.post("/policy")
    def policy():
        return jsonify({"responses": [[answer["text"]] for _ in request.get_json()["prompts"]]})
    server = servers.ThreadServer(app)
    control = f"http://127.0.0.1:{stack.bedrock.port}/_local/models/{MODEL}/policy"
    assert http("POST", control, body={"url": f"http://127.0.0.1:{server.port}/policy"})[0] == 200
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    yield team_id, client, answer
    http("POST", control, body={"url": None})
    server.stop()


def test_a_blocked_prompt_is_a_400_with_nothing_sent_upstream_and_the_check_on_the_ledger(guarded, stack):
    import openai

    from chalicelib.spend import ledger

    team_id, client, _ = guarded
    upstream = len([r for r in stack.bedrock_state.requests if r["path"].endswith("/chat/completions")])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=20,
                                       messages=[{"role": "user", "content": "tell me the launch codes"}])
    assert err.value.code == "content_filter"
    assert len([r for r in stack.bedrock_state.requests if r["path"].endswith("/chat/completions")]) == upstream
    entries = ledger.entries(team_id)
    (check,) = [e for e in entries if e.kind == "guardrail"]
    assert check.cost_micro > 0 and check.request_id.endswith(".guardrail-input")
    assert [e.status for e in entries if e.kind == "inference"] == [400]           # the call: refused, at $0


def test_an_answer_with_an_address_comes_back_masked(guarded):
    _, client, answer = guarded
    answer["text"] = "write to ana@example.com today"
    reply = client.chat.completions.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "who?"}])
    assert reply.choices[0].message.content == "write to {EMAIL} today"


def test_a_stream_stops_in_its_middle_with_content_filter(guarded):
    _, client, answer = guarded
    answer["text"] = "safe " * 400 + "the launch codes are 1234 " + "more " * 400
    text, finish = "", None
    for chunk in client.chat.completions.create(model=MODEL, max_tokens=2000, stream=True,
                                                messages=[{"role": "user", "content": "talk"}]):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "content_filter"
    assert text.startswith("safe safe") and "launch codes" not in text and "more" not in text


def test_a_short_chat_stream_is_checked_whole_at_its_end(guarded):
    _, client, answer = guarded
    answer["text"] = "the launch codes are 1234"
    stream = client.chat.completions.create(model=MODEL, max_tokens=50, stream=True,
                                            messages=[{"role": "user", "content": "talk"}])
    chunks = list(stream)                                  # a short answer: checked whole at its end
    assert "launch codes" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        ["content_filter"]


def _streamed_response(client, **kwargs):
    events = list(client.responses.create(model=MODEL, input="talk", stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))    # renumbered, none missing
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return events, text


def test_a_streamed_response_stops_in_its_middle_with_content_filter(guarded):
    from chalicelib.spend import ledger

    team_id, client, answer = guarded
    answer["text"] = "safe " * 400 + "the launch codes are 1234 " + "more " * 400
    events, text = _streamed_response(client, max_output_tokens=2000)
    assert text == "safe " * 400                           # two chunks of 1,000 passed, the third never sent
    final = events[-1]
    assert final.type == "response.incomplete" and final.response.status == "incomplete"
    assert final.response.incomplete_details.reason == "content_filter"
    assert final.response.usage is not None and final.response.usage.output_tokens > 0
    repeated = [e.text for e in events if e.type == "response.output_text.done"] + \
        [c.text for e in events if e.type == "response.output_item.done" for c in e.item.content] + \
        [c.text for item in final.response.output for c in item.content]
    assert repeated and all(t == text for t in repeated)   # no event repeats the upstream's text
    assert [e.item.status for e in events if e.type == "response.output_item.done"] == ["incomplete"]
    checks = [e for e in ledger.entries(team_id) if e.kind == "guardrail" and e.request_id.endswith(".guardrail-output")]
    assert len(checks) == 1 and checks[0].cost_micro == 300      # three checks, one PII unit each
    assert "launch codes" not in str([e.model_dump() for e in events])


def test_a_streamed_response_is_masked_and_its_checks_priced(guarded):
    from chalicelib.spend import ledger

    team_id, client, answer = guarded
    answer["text"] = "write to ana@example.com today"
    events, text = _streamed_response(client, max_output_tokens=50)
    assert text == "write to {EMAIL} today"
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == "write to {EMAIL} today"
    assert "ana@example.com" not in str([e.model_dump() for e in events])
    (check,) = [e for e in ledger.entries(team_id) if e.kind == "guardrail" and e.request_id.endswith(".guardrail-output")]
    assert check.cost_micro == 100                                # one PII text unit at $0.10 per 1,000


def test_a_streamed_call_looks_its_guardrail_up_once(guarded, monkeypatch):
    """gateway passes the guardrail it looked up to every check of the call (counted, not replaced)."""
    _, client, answer = guarded
    answer["text"] = "fine " * 300
    looked_up = []
    real = guardrails.for_call
    monkeypatch.setattr(guardrails, "for_call", lambda *a: looked_up.append(a) or real(*a))
    list(client.chat.completions.create(model=MODEL, max_tokens=500, stream=True,
                                        messages=[{"role": "user", "content": "talk"}]))
    assert len(looked_up) == 1
    _streamed_response(client, max_output_tokens=500)
    client.chat.completions.create(model=MODEL, max_tokens=500, messages=[{"role": "user", "content": "talk"}])
    assert len(looked_up) == 3


def test_a_plain_answer_is_filtered_as_openai_filters(make_team, make_guardrail):
    """filter_answer: what the gateway sends instead of a plain answer (chat and responses)."""
    team_id, _ = make_team("guard-answers")
    g = make_guardrail(blocked_words=["launch codes"], pii=[{"type": "EMAIL", "action": "ANONYMIZE"}])
    guardrails.attach(team_id, g["guardrailId"], "1", None, 1)
    chat = {"object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "mail a@b.co"}},
        {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": "the launch codes: 1"}},
        {"index": 2, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None}}]}
    raw, cost = guardrails.filter_answer(team_id, None, json.dumps(chat).encode(), "chat")
    out = json.loads(raw)
    assert [c["message"]["content"] for c in out["choices"]] == ["mail {EMAIL}", "", None]
    assert [c["finish_reason"] for c in out["choices"]] == ["stop", "content_filter", "tool_calls"]
    assert cost == 200                                      # two checks, one PII unit each
    response = {"object": "response", "status": "completed", "incomplete_details": None, "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "the launch codes", "annotations": []}]}]}
    out = json.loads(guardrails.filter_answer(team_id, None, json.dumps(response).encode(), "responses")[0])
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "content_filter"}
    assert out["output"][0]["content"][0]["text"] == ""
    clean = json.dumps({"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}]}).encode()
    assert guardrails.filter_answer(team_id, None, clean, "chat") == (clean, 100)
    other, _ = make_team("guard-answers-none")
    assert guardrails.filter_answer(other, None, b"not json", "chat") == (b"not json", 0)


def test_a_responses_stream_never_repeats_unchecked_text_whatever_events_carry_it(make_team, make_guardrail):
    """ResponsesGuard on event sequences the local model does not send: text that arrives only in a
    `done` event or only in the final response is checked before it is sent; after a block, an
    upstream error still ends the stream with response.incomplete."""
    from chalicelib.inference.stream import ResponsesGuard

    team_id, _ = make_team("guard-response-events")
    g = make_guardrail(blocked_words=["launch codes"], pii=[{"type": "EMAIL", "action": "ANONYMIZE"}])
    guardrails.attach(team_id, g["guardrailId"], "1", None, 1)
    guardrail = guardrails.for_call(team_id, None)
    costs = []

    def guard():
        return ResponsesGuard(lambda: guardrails.OutputGuard(team_id, None, 50, guardrail=guardrail), costs.append)

    def part(text):
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(text):
        return {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed", "content": [part(text)]}
    ids = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    start = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}

    # Only a done event carries the text (no deltas): checked, masked, sent as one delta first.
    g1 = guard()
    sent = [e for ev in [{"type": "response.created", "response": start},
                         {"type": "response.output_item.added", "output_index": 0, "item": {**item(""), "content": []}},
                         {"type": "response.output_text.done", **ids, "text": "mail ana@example.com"},
                         {"type": "response.content_part.done", **ids, "part": part("mail ana@example.com")},
                         {"type": "response.output_item.done", "output_index": 0, "item": item("mail ana@example.com")},
                         {"type": "response.completed", "response": {**start, "status": "completed",
                                                                     "output": [item("mail ana@example.com")]}}]
            for e in g1.apply(ev)]
    assert "ana@example.com" not in json.dumps(sent)
    assert [e["type"] for e in sent][2:4] == ["response.output_text.delta", "response.output_text.done"]
    assert sent[2]["delta"] == "mail {EMAIL}" and sent[-1]["response"]["output"][0]["content"][0]["text"] == \
        "mail {EMAIL}"
    assert [e["sequence_number"] for e in sent] == list(range(len(sent)))

    # Only the final response carries a blocked text: the end is response.incomplete, content_filter.
    g2 = guard()
    final = g2.apply({"type": "response.completed", "response": {**start, "status": "completed",
                                                                "output": [item("the launch codes")]}})
    assert [e["type"] for e in final] == ["response.incomplete"]
    assert final[0]["response"]["incomplete_details"] == {"reason": "content_filter"}
    assert "launch codes" not in json.dumps(final)

    # Cut in a delta, then Bedrock's stream fails: still ended as incomplete, nothing more sent.
    g3 = guard()
    out = g3.apply({"type": "response.output_text.delta", **ids, "delta": "x " * 30 + "the launch codes " * 5})
    assert [e["type"] for e in out] == ["response.output_text.done", "response.content_part.done",
                                        "response.output_item.done"]
    assert out[0]["text"] == "x " * 25 and out[2]["item"]["status"] == "incomplete"
    assert g3.apply({"type": "response.output_text.delta", **ids, "delta": "more"}) == []
    end = g3.apply({"type": "error", "code": "server_error", "message": "broke"})
    assert [e["type"] for e in end] == ["response.incomplete"] and "launch" not in json.dumps(end)
    g3.charge()
    assert costs[-1] == 2 * 100                         # two checks, one PII unit each
