"""The local Bedrock's stand-in model: answers, judge replies, tool calls, structured output,
logprobs and the paced SSE writers, for both its faces (Mantle's chat completions and responses,
the native Converse API)."""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Any

from local.bedrock_state import STREAM_HOLD_LIMIT_SECONDS, State


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def judge_reply(prompt: str) -> str | None:
    """A stand-in LLM judge: prompts with "Reference:" and "Answer:" lines get {"score": similarity}."""
    import difflib

    ref = re.search(r"Reference:\s*(.*)", prompt)
    ans = re.search(r"Answer:\s*(.*)", prompt)
    if not ref or not ans:
        return None
    if "REFUSE" in prompt:
        return "I'm sorry, I can't grade this."
    ratio = difflib.SequenceMatcher(None, ref.group(1).strip().lower(), ans.group(1).strip().lower()).ratio()
    return json.dumps({"score": round(ratio, 3)})


POLICY = threading.local()     # this request's answer from the model's policy, if it has one


def _generate(prompt: str, model: str, max_tokens: int | None) -> tuple[str, dict, bool]:
    """(text, usage, cut short by max_tokens) of one plain completion."""
    chosen = getattr(POLICY, "text", None)
    if chosen is not None:         # POST /_local/models/{model}/policy
        return chosen, _usage(prompt, len(pieces(chosen))), False
    judged = judge_reply(prompt)
    if judged is not None:
        return judged, _usage(prompt, 8), False
    words = (f"[{model}] " + (prompt[-200:] if prompt else "ok")).split()
    truncated = bool(max_tokens) and len(words) > int(max_tokens)
    if max_tokens:
        words = words[: max(1, int(max_tokens))]
    return " ".join(words), _usage(prompt, len(words)), truncated


def _usage(prompt: str, completion_tokens: int) -> dict:
    p = _tokens(prompt)
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


# ---- inference: complete answers, as Bedrock's OpenAI-compatible endpoint gives them -------------
# Every body carries what OpenAI's API reference requires (choices[].logprobs, message.refusal; on a
# response: error, incomplete_details, instructions, metadata, temperature, top_p, usage details ...),
# and honours what the request asks for: `n` choices, a tool call when `tool_choice` requires one,
# JSON matching a `json_schema` response format, logprobs.

class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _int_in(body: dict, name: str, lo: int, hi: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be an integer from {lo} to {hi}.", name)
    return value


def schema_instance(schema: Any, root: Any, depth: int = 0) -> Any:
    """A value valid against a (JSON Schema) response format or tool parameters: what a model
    constrained to the schema answers (required properties, and all of them when none are)."""
    if not isinstance(schema, dict) or depth > 12:
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return schema_instance(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = [o for o in schema.get(key) or [] if not (isinstance(o, dict) and o.get("type") == "null")]
        if options:
            return schema_instance(options[0], root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict = {}
        for part in schema["allOf"]:
            value = schema_instance(part, root, depth + 1)
            if isinstance(value, dict):
                merged.update(value)
        return merged
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        names = schema.get("required") or list(props)
        return {n: schema_instance(props.get(n, {}), root, depth + 1) for n in names}
    if kind == "array":
        return [schema_instance(schema.get("items") or {}, root, depth + 1)
                for _ in range(max(1, int(schema.get("minItems") or 0)))]
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = lo + (1 if "exclusiveMinimum" in schema else 0)
        hi = schema.get("maximum")
        value = min(value, hi) if hi is not None else value
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = "ok" * max(1, int(schema.get("minLength") or 1))
    return text[: schema["maxLength"]] if schema.get("maxLength") else text


def pieces(text: str) -> list[str]:
    """The text as the tokens it is streamed and scored in (they add up to the text)."""
    return re.findall(r"\S+\s*|\s+", text) or [text]


def _logprobs(text: str, top: int) -> list[dict]:
    out = []
    for i, token in enumerate(pieces(text)):
        logprob = -round(0.01 + 0.03 * (i % 7), 4)
        alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
        alternatives += [{"token": f"{token.strip()}{k}", "logprob": round(logprob - 1.5 * k, 4),
                          "bytes": list(f"{token.strip()}{k}".encode())} for k in range(1, top)]
        out.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                    "top_logprobs": alternatives[:top]})
    return out


def _chat_tools(body: dict) -> tuple[list[dict], dict | None]:
    """(offered function tools, the tool the model must call or None)."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", "tools")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}.",
                             f"tools[{i}]")
        names.append(fn["name"])
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none"):
        return tools, None
    if not tools:
        raise BadRequest("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
    if choice == "required":
        return tools, tools[0]["function"]
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise BadRequest(f"tool_choice names function {name!r}, which is not in 'tools'.", "tool_choice")
        return tools, tools[names.index(name)]["function"]
    raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or a function.", "tool_choice")


def _json_format(fmt: Any, param: str) -> dict | None:
    """The JSON schema a response format asks for ({} for json_object), None for text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest(f"'{param}.type' must be 'text', 'json_object' or 'json_schema'.", param)
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {}
    spec = fmt.get("json_schema") if param == "response_format" else fmt
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise BadRequest(f"'{param}' of type json_schema needs a 'name'.", param)
    schema = spec.get("schema") or {}
    if not isinstance(schema, dict):
        raise BadRequest(f"'{param}' schema must be an object.", param)
    return schema


def _json_text(schema: dict, text: str) -> str:
    value = schema_instance(schema, schema) if schema else {"answer": text}
    return json.dumps(value)


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def chat_completion(body: dict) -> dict:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list.", "messages")
    n = _int_in(body, "n", 1, 128, 1)
    want_logprobs = body.get("logprobs")
    if want_logprobs is not None and not isinstance(want_logprobs, bool):
        raise BadRequest("'logprobs' must be a boolean.", "logprobs")
    top = _int_in(body, "top_logprobs", 0, 20, 0)
    if body.get("top_logprobs") is not None and not want_logprobs:
        raise BadRequest("'logprobs' must be true when 'top_logprobs' is set.", "top_logprobs")
    _, forced = _chat_tools(body)
    schema = _json_format(body.get("response_format"), "response_format")
    prompt_text = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    text, usage, truncated = _generate(prompt_text, body.get("model"), body.get("max_tokens") or
                                       body.get("max_completion_tokens"))
    choices, completion_tokens = [], 0
    for index in range(n):
        message: dict = {"role": "assistant", "content": None, "refusal": None}
        if forced is not None:
            message["tool_calls"] = [{"id": _call_id(), "type": "function", "function": {
                "name": forced["name"], "arguments": _json_text(forced.get("parameters") or {"type": "object"}, "")}}]
            finish, scored = "tool_calls", None
            completion_tokens += _tokens(message["tool_calls"][0]["function"]["arguments"])
        else:
            content = _json_text(schema, text) if schema is not None else text
            message["content"] = content
            finish, scored = ("length" if truncated and schema is None else "stop"), content
            completion_tokens += len(pieces(content))
        logprobs = {"content": _logprobs(scored, top) if scored is not None else None, "refusal": None} \
            if want_logprobs else None
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    usage = {**usage, "completion_tokens": completion_tokens,
             "total_tokens": usage["prompt_tokens"] + completion_tokens}
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:20], "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "choices": choices, "usage": usage, "service_tier": "default"}


def sse_chat(answer: dict, include_usage: bool):
    """The same answer as `chat.completion.chunk`s: per choice a role chunk, its content (or tool
    call) piece by piece with its logprobs, a finish chunk; then the usage chunk if asked for."""
    base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
            "model": answer["model"], "service_tier": answer["service_tier"]}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        return "data: " + json.dumps({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                            "finish_reason": finish}]}) + "\n\n"

    for choice in answer["choices"]:
        i, message = choice["index"], choice["message"]
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            yield chunk(i, {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"index": 0, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": ""}}]})
            for piece in pieces(call["function"]["arguments"]):
                yield chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
            scored = (choice["logprobs"] or {}).get("content") or []
            for k, piece in enumerate(pieces(message["content"])):
                logprobs = {"content": scored[k:k + 1], "refusal": None} if choice["logprobs"] else None
                yield chunk(i, {"content": piece}, logprobs=logprobs)
        yield chunk(i, {}, choice["finish_reason"])
    if include_usage:
        yield "data: " + json.dumps({**base, "choices": [], "usage": answer["usage"]}) + "\n\n"
    yield "data: [DONE]\n\n"


def sse_response(answer: dict):
    """The same response as the Responses API streams it: response.created and .in_progress,
    then per output item its added / delta / done events, then response.completed (or
    .incomplete) carrying the whole response with its usage."""
    seq = -1

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: " + json.dumps({"type": kind, **fields, "sequence_number": seq}) + "\n\n"

    # In progress: no output yet and no usage (OpenAI's document has no null usage).
    started = {**{k: v for k, v in answer.items() if k != "usage"}, "status": "in_progress", "output": [],
               "completed_at": None, "incomplete_details": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    for i, item in enumerate(answer["output"]):
        if item["type"] == "message":
            yield event("response.output_item.added", output_index=i,
                        item={**item, "status": "in_progress", "content": []})
            for c, part in enumerate(item["content"]):
                ids = {"item_id": item["id"], "output_index": i, "content_index": c}
                scored = part.get("logprobs") or []
                yield event("response.content_part.added", **ids, part={**part, "text": "", "logprobs": []})
                for k, piece in enumerate(pieces(part["text"])):
                    yield event("response.output_text.delta", **ids, delta=piece, logprobs=scored[k:k + 1])
                yield event("response.output_text.done", **ids, text=part["text"], logprobs=scored)
                yield event("response.content_part.done", **ids, part=part)
        elif item["type"] == "function_call":
            yield event("response.output_item.added", output_index=i,
                        item={**item, "status": "in_progress", "arguments": ""})
            for piece in pieces(item["arguments"]):
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=i, delta=piece)
            yield event("response.function_call_arguments.done", item_id=item["id"], name=item["name"],
                        output_index=i, arguments=item["arguments"])
        else:
            yield event("response.output_item.added", output_index=i, item=item)
        yield event("response.output_item.done", output_index=i, item=item)
    final = "response.completed" if answer["status"] == "completed" else "response.incomplete"
    yield event(final, response=answer)


class StreamCut(Exception):
    """Raised inside a streamed body: the server drops the connection mid-answer."""


def paced(state: State, events, style: str):
    """Streams `events` as a real endpoint does: spaced in time, held, failed or cut as configured
    (the settings in force when the stream starts)."""
    with state.lock:
        settings = dict(state.stream)
        release = state.stream_release
    sequence = -1
    for count, chunk in enumerate(events):
        time.sleep((settings["stream_ttft_ms"] if count == 0 else settings["stream_token_ms"]) / 1000)
        if count and count == settings["stream_cut_after"]:
            raise StreamCut(f"stream cut after {count} events (stream_cut_after)")
        if count and count == settings["stream_error_after"]:
            if style == "chat":
                yield "data: " + json.dumps({"error": {"message": "Injected stream failure.", "type": "server_error",
                                                       "param": None, "code": "internal_error"}}) + "\n\n"
            else:
                yield "event: error\ndata: " + json.dumps({"type": "error", "code": "internal_error",
                                                           "message": "Injected stream failure.", "param": None,
                                                           "sequence_number": sequence + 1}) + "\n\n"
            return
        found = re.search(r'"sequence_number": (\d+)', chunk)
        sequence = int(found.group(1)) if found else sequence
        yield chunk
        if count == 0 and settings["stream_hold"]:
            with state.lock:
                state.streams_held += 1
            try:
                release.wait(STREAM_HOLD_LIMIT_SECONDS)
            finally:
                with state.lock:
                    state.streams_held -= 1


def _response_tools(body: dict) -> tuple[list[dict], dict | None]:
    """(the tools as a response echoes them, the function the model must call or None)."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", "tools")
    echoed = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise BadRequest(f"tools[{i}]: only function tools ({{'type': 'function', 'name': ...}}) are "
                             "supported.", f"tools[{i}]")
        echoed.append({"type": "function", "name": tool["name"], "description": tool.get("description"),
                       "parameters": tool.get("parameters"),
                       "strict": tool.get("strict") if tool.get("strict") is not None else True})
    choice = body.get("tool_choice", "auto")
    if choice in ("auto", "none"):
        return echoed, None
    if not echoed:
        raise BadRequest("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
    if choice == "required":
        return echoed, echoed[0]
    if isinstance(choice, dict) and choice.get("type") == "function":
        found = next((t for t in echoed if t["name"] == choice.get("name")), None)
        if found is None:
            raise BadRequest(f"tool_choice names function {choice.get('name')!r}, which is not in 'tools'.",
                             "tool_choice")
        return echoed, found
    raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or a function.", "tool_choice")


def _number_in(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be a number from {lo} to {hi}.", name)
    return value


def response_answer(body: dict) -> dict:
    given = body.get("input")
    if given is None:
        raise BadRequest("'input' is required.", "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("'instructions' must be a string.", "instructions")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise BadRequest("'metadata' must be an object of strings.", "metadata")
    temperature = _number_in(body, "temperature", 0, 2, 1.0)
    top_p = _number_in(body, "top_p", 0, 1, 1.0)
    max_output = _int_in(body, "max_output_tokens", 1, 10**7, None)
    top = _int_in(body, "top_logprobs", 0, 20, 0)
    include = body.get("include") or []
    tools, forced = _response_tools(body)
    text_param = body.get("text") or {"format": {"type": "text"}}
    if not isinstance(text_param, dict):
        raise BadRequest("'text' must be an object.", "text")
    schema = _json_format(text_param.get("format"), "text.format")
    prompt_text = given if isinstance(given, str) else json.dumps(given)
    if instructions:
        prompt_text = f"{instructions}\n{prompt_text}"
    text, usage, truncated = _generate(prompt_text, body.get("model"), max_output)
    rid = "resp_" + uuid.uuid4().hex[:24]
    if forced is not None:
        arguments = _json_text(forced.get("parameters") or {"type": "object"}, "")
        output = [{"type": "function_call", "id": "fc_" + rid[5:], "call_id": _call_id(), "name": forced["name"],
                   "arguments": arguments, "status": "completed"}]
        output_tokens, truncated = _tokens(arguments), False
    else:
        content = _json_text(schema, text) if schema is not None else text
        truncated = truncated and schema is None
        logprobs = _logprobs(content, top) if "message.output_text.logprobs" in include else []
        output = [{"type": "message", "id": "msg_" + rid[5:], "role": "assistant",
                   "status": "incomplete" if truncated else "completed",
                   "content": [{"type": "output_text", "text": content, "annotations": [], "logprobs": logprobs}]}]
        output_tokens = len(pieces(content))
    now = int(time.time())
    return {"id": rid, "object": "response", "created_at": now,
            "status": "incomplete" if truncated else "completed", "completed_at": None if truncated else now,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
            "instructions": instructions, "max_output_tokens": max_output, "max_tool_calls": body.get("max_tool_calls"),
            "model": body["model"], "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": body.get("store", True), "temperature": temperature,
            "text": {"format": {"type": "text"}, "verbosity": "medium", **text_param}, "tool_choice": body.get(
                "tool_choice", "auto"), "tools": tools, "top_logprobs": top, "top_p": top_p, "truncation": "disabled",
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": output_tokens,
                      "total_tokens": usage["prompt_tokens"] + output_tokens,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
            "metadata": metadata or {}}
