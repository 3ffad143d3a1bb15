"""OpenAI chat completions and Responses <-> Bedrock Converse (chalicelib/domain/converse.py): pure,
table-driven, both ways; every request checked against botocore's own service model, every answer
against OpenAI's published document."""
import base64
import json

import openai_spec as spec
import pytest
from botocore.session import get_session
from botocore.validate import ParamValidator

from chalicelib.domain import converse
from chalicelib.errors import InvalidRequest

DEPLOYMENT = "arn:aws:bedrock:us-west-2:123456789012:custom-model-deployment/abcdef123456"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
FN = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                       "parameters": WEATHER}}


def _valid_converse(request: dict, operation: str = "Converse") -> None:
    """botocore's own client-side check of Converse's arguments (what the real client runs)."""
    model = get_session().get_service_model("bedrock-runtime").operation_model(operation)
    report = ParamValidator().validate({"modelId": DEPLOYMENT, **request}, model.input_shape)
    assert not report.has_errors(), report.generate_report()


# ---- requests: chat completions -> Converse ------------------------------------------------------

CHAT_CASES = [
    ("plain", {"messages": [{"role": "user", "content": "Hi"}]},
     {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}),
    ("system and developer become system blocks",
     {"messages": [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": [
         {"type": "text", "text": "No emoji."}]}, {"role": "user", "content": "Hi"}]},
     {"system": [{"text": "Be brief."}, {"text": "No emoji."}], "messages": [{"role": "user", "content": [{"text": "Hi"}]}]}),
    ("sampling", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50, "temperature": 0.2,
                  "top_p": 0.9, "stop": "END"},
     {"messages": [{"role": "user", "content": [{"text": "Hi"}]}],
      "inferenceConfig": {"maxTokens": 50, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"]}}),
    ("max_completion_tokens wins over max_tokens", {"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 500, "max_completion_tokens": 7, "stop": ["a", "b"]},
     {"messages": [{"role": "user", "content": [{"text": "Hi"}]}],
      "inferenceConfig": {"maxTokens": 7, "stopSequences": ["a", "b"]}}),
    ("consecutive user turns merge", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [
        {"type": "text", "text": "b"}]}]},
     {"messages": [{"role": "user", "content": [{"text": "a"}, {"text": "b"}]}]}),
    ("tools, a forced tool, and the round trip of a call",
     {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                       "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "12C, rain"},
                   {"role": "user", "content": "And tomorrow?"}],
      "tools": [FN], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     {"messages": [{"role": "user", "content": [{"text": "Weather in Oslo?"}]},
                   {"role": "assistant", "content": [{"toolUse": {"toolUseId": "call_1", "name": "get_weather",
                                                                  "input": {"city": "Oslo"}}}]},
                   {"role": "user", "content": [{"toolResult": {"toolUseId": "call_1", "content": [{"text": "12C, rain"}]}},
                                                {"text": "And tomorrow?"}]}],
      "toolConfig": {"tools": [{"toolSpec": {"name": "get_weather", "description": "Weather in a city",
                                             "inputSchema": {"json": WEATHER}}}],
                     "toolChoice": {"tool": {"name": "get_weather"}}}}),
    ("required is any; auto is Converse's default",
     {"messages": [{"role": "user", "content": "x"}], "tools": [FN], "tool_choice": "required"},
     {"messages": [{"role": "user", "content": [{"text": "x"}]}],
      "toolConfig": {"tools": [{"toolSpec": {"name": "get_weather", "description": "Weather in a city",
                                             "inputSchema": {"json": WEATHER}}}], "toolChoice": {"any": {}}}}),
    ("none without tool history drops the tools", {"messages": [{"role": "user", "content": "x"}], "tools": [FN],
                                                   "tool_choice": "none"},
     {"messages": [{"role": "user", "content": [{"text": "x"}]}]}),
    ("OpenAI defaults are accepted, stream and include_usage are the caller's",
     {"messages": [{"role": "user", "content": "x"}], "n": 1, "parallel_tool_calls": True, "logprobs": False,
      "presence_penalty": 0, "frequency_penalty": 0.0, "store": False, "stream": True,
      "stream_options": {"include_usage": True}, "service_tier": "auto", "seed": None},
     {"messages": [{"role": "user", "content": [{"text": "x"}]}]}),
    ("metadata, service tier, json_schema",
     {"messages": [{"role": "user", "content": "x"}], "metadata": {"app": "support"}, "service_tier": "flex",
      "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}},
     {"messages": [{"role": "user", "content": [{"text": "x"}]}], "requestMetadata": {"app": "support"},
      "serviceTier": {"type": "flex"},
      "outputConfig": {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": {
          "schema": json.dumps(WEATHER, separators=(",", ":")), "name": "w"}}}}}),
]


@pytest.mark.parametrize("name,body,expected", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_requests_translate(name, body, expected):
    got = converse.chat_request({"model": "m", **body})
    assert got == expected
    _valid_converse(got)
    _valid_converse(got, "ConverseStream")


def test_a_data_url_image_becomes_bytes():
    png = base64.b64encode(b"\x89PNG fake").decode()
    got = converse.chat_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}]})
    assert got["messages"][0]["content"][1] == {"image": {"format": "png", "source": {"bytes": b"\x89PNG fake"}}}
    _valid_converse(got)


CHAT_REFUSED = [
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"seed": 7}, "seed", "unsupported_parameter"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"logit_bias": {"1": 2}}, "logit_bias", "unsupported_parameter"),
    ({"user": "u-1"}, "user", "unsupported_parameter"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_parameter"),
    ({"service_tier": "scale"}, "service_tier", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format.type", "unsupported_parameter"),
    ({"temperature": 1.5}, "temperature", "invalid_value"),
    ({"top_p": 2}, "top_p", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
    ({"tools": [FN], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "invalid_value"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", "unsupported_parameter"),
    ({"messages": [{"role": "assistant", "content": "hello"}]}, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages[0].content[0].image_url", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}],
      "tools": [FN]}, "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}, "tools", "invalid_value"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role", "unsupported_parameter"),
]


@pytest.mark.parametrize("extra,param,code", CHAT_REFUSED, ids=[c[1] for c in CHAT_REFUSED])
def test_chat_parameters_without_an_equivalent_are_a_400_naming_them(extra, param, code):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(InvalidRequest) as err:
        converse.chat_request(body)
    assert err.value.param == param and err.value.code == code and err.value.status == 400


# ---- requests: Responses -> Converse -----------------------------------------------------------

RESPONSES_CASES = [
    ("a string", {"input": "Hi", "instructions": "Be brief.", "max_output_tokens": 20},
     {"system": [{"text": "Be brief."}], "messages": [{"role": "user", "content": [{"text": "Hi"}]}],
      "inferenceConfig": {"maxTokens": 20}}),
    ("items with a function call and its output",
     {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"},
                {"type": "function_call_output", "call_id": "call_9", "output": "sunny"}],
      "tools": [{"type": "function", "name": "get_weather", "parameters": WEATHER}], "tool_choice": "auto",
      "temperature": 0.5},
     {"messages": [{"role": "user", "content": [{"text": "Weather?"}]},
                   {"role": "assistant", "content": [{"toolUse": {"toolUseId": "call_9", "name": "get_weather",
                                                                  "input": {"city": "Rome"}}}]},
                   {"role": "user", "content": [{"toolResult": {"toolUseId": "call_9", "content": [{"text": "sunny"}]}}]}],
      "inferenceConfig": {"temperature": 0.5},
      "toolConfig": {"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": WEATHER}}}]}}),
    ("a forced function", {"input": "x", "tools": [{"type": "function", "name": "f"}],
                           "tool_choice": {"type": "function", "name": "f"}, "store": False, "truncation": "disabled"},
     {"messages": [{"role": "user", "content": [{"text": "x"}]}],
      "toolConfig": {"tools": [{"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object", "properties": {}}}}}],
                     "toolChoice": {"tool": {"name": "f"}}}}),
]


@pytest.mark.parametrize("name,body,expected", RESPONSES_CASES, ids=[c[0] for c in RESPONSES_CASES])
def test_responses_requests_translate(name, body, expected):
    got = converse.responses_request({"model": "m", **body})
    assert got == expected
    _valid_converse(got)


@pytest.mark.parametrize("extra,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"store": True}, "store"), ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format.type"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"tools": [{"type": "file_search"}]}, "tools[0].type"),
])
def test_responses_parameters_without_an_equivalent_are_a_400(extra, param):
    with pytest.raises(InvalidRequest) as err:
        converse.responses_request({"model": "m", "input": "x", **extra})
    assert err.value.param == param


# ---- answers: Converse -> OpenAI -----------------------------------------------------------------

def _answer(content, stop="end_turn", usage=None):
    return {"output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop,
            "usage": usage or {"inputTokens": 10, "outputTokens": 4, "totalTokens": 14}, "metrics": {"latencyMs": 5}}


STOP_CASES = [("end_turn", "stop", "completed"), ("stop_sequence", "stop", "completed"),
              ("max_tokens", "length", "incomplete"), ("tool_use", "tool_calls", "completed"),
              ("content_filtered", "content_filter", "incomplete"), ("guardrail_intervened", "content_filter", "incomplete"),
              ("model_context_window_exceeded", "length", "incomplete"), ("malformed_tool_use", "stop", "completed")]


@pytest.mark.parametrize("stop,finish,status", STOP_CASES)
def test_stop_reasons(stop, finish, status):
    chat = converse.chat_completion(_answer([{"text": "hi"}], stop), model="m", id_="chatcmpl-1", created=1)
    assert chat["choices"][0]["finish_reason"] == finish
    resp = converse.response_object(_answer([{"text": "hi"}], stop), body={}, model="m", id_="resp_1", created=1)
    assert resp["status"] == status
    spec.validate("post", "/v1/chat/completions", 200, chat)
    spec.validate("post", "/v1/responses", 200, resp)


def test_answers_with_text_and_a_tool_call():
    answer = _answer([{"text": "Let me check."}, {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather",
                                                              "input": {"city": "Oslo"}}}], "tool_use",
                     {"inputTokens": 20, "outputTokens": 9, "totalTokens": 35, "cacheReadInputTokens": 6})
    chat = converse.chat_completion(answer, model="amazon.nova-2-lite-v1:0:256k:ft:x", id_="chatcmpl-1", created=5)
    message = chat["choices"][0]["message"]
    assert message["content"] == "Let me check."
    assert message["tool_calls"] == [{"id": "tooluse_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]
    assert chat["usage"]["prompt_tokens"] == 26 and chat["usage"]["completion_tokens"] == 9
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 6 and chat["usage"]["total_tokens"] == 35
    spec.validate("post", "/v1/chat/completions", 200, chat)

    resp = converse.response_object(answer, body={"tools": [{"type": "function", "name": "get_weather",
                                                             "parameters": WEATHER}]}, model="m", id_="resp_abc",
                                    created=5)
    assert [i["type"] for i in resp["output"]] == ["message", "function_call"]
    assert resp["output"][1]["call_id"] == "tooluse_1" and json.loads(resp["output"][1]["arguments"]) == {"city": "Oslo"}
    assert resp["usage"] == {"input_tokens": 26, "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 0},
                             "output_tokens": 9,
                             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 35}
    spec.validate("post", "/v1/responses", 200, resp)


def test_tool_only_answer_has_null_content():
    chat = converse.chat_completion(_answer([{"toolUse": {"toolUseId": "t", "name": "f", "input": {}}}], "tool_use"),
                                    model="m", id_="chatcmpl-2", created=1)
    assert chat["choices"][0]["message"]["content"] is None
    spec.validate("post", "/v1/chat/completions", 200, chat)


# ---- streams: ConverseStream events -> OpenAI events ---------------------------------------------

TOOL_STREAM = [
    {"messageStart": {"role": "assistant"}},
    {"contentBlockDelta": {"delta": {"text": "Checking "}, "contentBlockIndex": 0}},
    {"contentBlockDelta": {"delta": {"text": "now."}, "contentBlockIndex": 0}},
    {"contentBlockStop": {"contentBlockIndex": 0}},
    {"contentBlockStart": {"start": {"toolUse": {"toolUseId": "tooluse_7", "name": "get_weather"}},
                           "contentBlockIndex": 1}},
    {"contentBlockDelta": {"delta": {"toolUse": {"input": "{\"city\":"}}, "contentBlockIndex": 1}},
    {"contentBlockDelta": {"delta": {"toolUse": {"input": "\"Oslo\"}"}}, "contentBlockIndex": 1}},
    {"contentBlockStop": {"contentBlockIndex": 1}},
    {"messageStop": {"stopReason": "tool_use"}},
    {"metadata": {"usage": {"inputTokens": 11, "outputTokens": 7, "totalTokens": 18}, "metrics": {"latencyMs": 9}}},
]


def test_chat_stream_translation():
    stream = converse.ChatStream(model="m", id_="chatcmpl-s", created=3)
    chunks = [c for e in TOOL_STREAM for c in stream.feed(e)]
    for chunk in chunks:
        spec.validate("post", "/v1/chat/completions", 200, chunk, "text/event-stream")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    args = "".join(t["function"].get("arguments") or "" for c in chunks if c["choices"]
                   for t in c["choices"][0]["delta"].get("tool_calls") or [])
    assert text == "Checking now." and json.loads(args) == {"city": "Oslo"}
    first_call = next(c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls"))
    assert first_call["choices"][0]["delta"]["tool_calls"][0]["id"] == "tooluse_7"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 11
    assert chunks[-1]["usage"]["completion_tokens"] == 7


def test_responses_stream_translation():
    stream = converse.ResponsesStream(body={"input": "x"}, model="m", id_="resp_s1", created=3)
    events = [ev for e in TOOL_STREAM for ev in stream.feed(e)]
    for event in events:
        spec.validate("post", "/v1/responses", 200, event, "text/event-stream")
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Checking now."
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["arguments"] == "{\"city\":\"Oslo\"}" and final["usage"]["total_tokens"] == 18


def test_a_stream_cut_by_max_tokens_is_incomplete():
    stream = converse.ResponsesStream(body={"input": "x"}, model="m", id_="resp_s2", created=3)
    events = [ev for e in [{"messageStart": {"role": "assistant"}},
                           {"contentBlockDelta": {"delta": {"text": "partial"}, "contentBlockIndex": 0}},
                           {"messageStop": {"stopReason": "max_tokens"}},
                           {"metadata": {"usage": {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2},
                                         "metrics": {"latencyMs": 1}}}] for ev in stream.feed(e)]
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    for event in events:
        spec.validate("post", "/v1/responses", 200, event, "text/event-stream")
