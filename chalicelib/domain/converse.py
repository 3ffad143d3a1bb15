"""OpenAI chat completions and the Responses API <-> Amazon Bedrock Converse / ConverseStream. Pure.

Amazon Nova 2 Lite (and so its custom models) is served through Converse, not the
OpenAI-compatible chat API (shared docs §4.4). The gateway translates:

* requests: `chat_request(body)` / `responses_request(body)` -> Converse's arguments (all but
  `modelId`); a parameter Converse has no equivalent for is a 400 naming it, never dropped;
* answers: `chat_completion(...)` / `response_object(...)` from a Converse answer;
* streams: `ChatStream` / `ResponsesStream` turn ConverseStream's events (as botocore decodes
  them: one-key dicts such as `{"contentBlockDelta": {...}}`) into OpenAI's stream events.

Usage: Converse reports `inputTokens` without the prompt-cache reads and writes
(`cacheReadInputTokens`, `cacheWriteInputTokens`; AWS's prompt-caching page -- UNCONFIRMED for
Nova custom models); OpenAI's prompt tokens include them, with the reads as `cached_tokens`.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from chalicelib.errors import InvalidRequest

# Converse stopReason -> (chat finish_reason, Responses incomplete reason or None when complete)
STOP_REASONS = {
    "end_turn": ("stop", None),
    "stop_sequence": ("stop", None),
    "tool_use": ("tool_calls", None),
    "max_tokens": ("length", "max_output_tokens"),
    "model_context_window_exceeded": ("length", "max_output_tokens"),
    "content_filtered": ("content_filter", "content_filter"),
    "guardrail_intervened": ("content_filter", "content_filter"),
    "malformed_model_output": ("stop", None),
    "malformed_tool_use": ("stop", None),
}
SERVICE_TIERS = {"default": "default", "flex": "flex", "priority": "priority"}   # "auto": not sent
IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                 "image/webp": "webp"}
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_USE_ID = re.compile(r"^[a-zA-Z0-9_.:-]{1,64}$")

# What each API's request may carry. Parameters translated below; parameters accepted only at
# OpenAI's default value (which changes nothing); anything else has no Converse equivalent.
CHAT_TRANSLATED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                             "stop", "tools", "tool_choice", "stream", "stream_options", "response_format",
                             "metadata", "service_tier"})
CHAT_DEFAULTS = {"n": 1, "parallel_tool_calls": True, "logprobs": False, "presence_penalty": 0,
                 "frequency_penalty": 0, "store": False}
RESPONSES_TRANSLATED = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
                                  "tools", "tool_choice", "stream", "metadata", "text", "service_tier"})
RESPONSES_DEFAULTS = {"parallel_tool_calls": True, "store": False, "truncation": "disabled", "background": False,
                      "include": [], "top_logprobs": 0}


def _unsupported(param: str, why: str = "") -> InvalidRequest:
    return InvalidRequest(f"'{param}' has no equivalent in Amazon Bedrock's Converse API, which serves this "
                          f"model{': ' + why if why else ''}.", param=param, code="unsupported_parameter")


def _invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def _refuse_others(body: dict, translated: frozenset, defaults: dict) -> None:
    for name, value in body.items():
        if name in translated or value is None:
            continue
        default = defaults.get(name, object())
        if value == default and isinstance(value, bool) == isinstance(default, bool):
            continue
        raise _unsupported(name, f"only {defaults[name]!r} is accepted" if name in defaults else "")


# ---- request pieces shared by both APIs -----------------------------------------------------------

def _image(url: Any, param: str) -> dict:
    """A data: URL as a Converse image block (Converse takes the bytes; it fetches no URL)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise _unsupported(param, "only data: URLs (base64 images) can be sent; Converse fetches no URL")
    header, _, data = url[5:].partition(",")
    mime, _, encoding = header.partition(";")
    if encoding != "base64" or mime.lower() not in IMAGE_FORMATS:
        raise _invalid(param, f"'{param}' must be a base64 data: URL of a png, jpeg, gif or webp image.")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(param, f"'{param}' is not valid base64.") from None
    return {"image": {"format": IMAGE_FORMATS[mime.lower()], "source": {"bytes": raw}}}


def _content_blocks(content: Any, param: str, text_types: tuple[str, ...], image_types: tuple[str, ...]) -> list[dict]:
    """A message's content (a string or a list of parts) as Converse content blocks."""
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise _invalid(param, f"'{param}' must be a string or a list of content parts.")
    blocks = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in text_types:
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{where}.text", f"'{where}.text' must be a string.")
            if text:
                blocks.append({"text": text})
        elif kind in image_types:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            blocks.append(_image(url, f"{where}.image_url"))
        else:
            raise _unsupported(f"{where}.type", f"content parts of type {kind!r} are not translated")
    return blocks


def _text_only(content: Any, param: str, types: tuple[str, ...]) -> str:
    blocks = _content_blocks(content, param, types, ())
    return "".join(b["text"] for b in blocks)


def _tool_input(arguments: Any, param: str) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except ValueError:
        raise _invalid(param, f"'{param}' must be a JSON object (Converse takes tool input as JSON).") from None
    if not isinstance(value, dict):
        raise _invalid(param, f"'{param}' must be a JSON object (Converse takes tool input as JSON).")
    return value


def _tool_use_id(value: Any, param: str) -> str:
    if not isinstance(value, str) or not TOOL_USE_ID.match(value):
        raise _invalid(param, f"'{param}' must be 1-64 letters, digits or _.:- (Converse's toolUseId).")
    return value


def _tool_name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not TOOL_NAME.match(value):
        raise _invalid(param, f"'{param}' must be 1-64 letters, digits, '_' or '-'.")
    return value


class _Turns:
    """Converse messages: roles alternate, so consecutive turns of one role are merged."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.tool_blocks = False

    def add(self, role: str, blocks: list[dict]) -> None:
        if not blocks:
            return
        self.tool_blocks = self.tool_blocks or any("toolUse" in b or "toolResult" in b for b in blocks)
        if self.messages and self.messages[-1]["role"] == role:
            self.messages[-1]["content"].extend(blocks)
        else:
            self.messages.append({"role": role, "content": list(blocks)})

    def checked(self, param: str) -> list[dict]:
        if not self.messages:
            raise _invalid(param, f"'{param}' must hold at least one user message.")
        if self.messages[0]["role"] != "user":
            raise _invalid(param, f"'{param}' must start with a user message (after any system messages): "
                                  "Converse conversations begin with the user.")
        return self.messages


def _inference(body: dict, max_name: str | tuple[str, ...]) -> dict:
    config: dict = {}
    for name in (max_name if isinstance(max_name, tuple) else (max_name,)):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _invalid(name, f"'{name}' must be a positive integer.")
            config["maxTokens"] = value
            break
    for name, native in (("temperature", "temperature"), ("top_p", "topP")):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise _invalid(name, f"'{name}' must be a number from 0 to 1 (Converse's range; OpenAI's "
                                 f"temperature goes to 2).")
        config[native] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or \
                not all(isinstance(s, str) and s for s in stops):
            raise _invalid("stop", "'stop' must be a non-empty string or a list of 1-4 non-empty strings.")
        config["stopSequences"] = stops
    return config


def _tool_config(specs: list[dict], choice: Any, turns: _Turns, choice_name) -> dict | None:
    """toolConfig from Converse tool specs and an OpenAI tool_choice (choice_name reads a named choice)."""
    if not specs:
        if choice not in (None, "none", "auto"):
            raise _invalid("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
        if turns.tool_blocks:
            raise _invalid("tools", "Converse needs 'tools' when the conversation holds tool calls or results.")
        return None
    if choice in (None, "auto"):
        return {"tools": specs}
    if choice == "none":
        if turns.tool_blocks:
            raise _unsupported("tool_choice", "'none' cannot be expressed while the conversation holds tool calls")
        return None
    if choice == "required":
        return {"tools": specs, "toolChoice": {"any": {}}}
    name = choice_name(choice) if isinstance(choice, dict) and choice.get("type") == "function" else None
    if name is None:
        raise _invalid("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or a function.")
    if name not in {s["toolSpec"]["name"] for s in specs}:
        raise _invalid("tool_choice", f"tool_choice names function {name!r}, which is not in 'tools'.")
    return {"tools": specs, "toolChoice": {"tool": {"name": name}}}


def _tool_spec(name: Any, description: Any, parameters: Any, strict: Any, param: str) -> dict:
    spec: dict = {"name": _tool_name(name, f"{param}.name")}
    if description:
        if not isinstance(description, str):
            raise _invalid(f"{param}.description", f"'{param}.description' must be a string.")
        spec["description"] = description
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise _invalid(f"{param}.parameters", f"'{param}.parameters' must be a JSON schema object.")
    spec["inputSchema"] = {"json": parameters}
    if strict is not None:
        if not isinstance(strict, bool):
            raise _invalid(f"{param}.strict", f"'{param}.strict' must be a boolean.")
        spec["strict"] = strict
    return {"toolSpec": spec}


def _json_schema_format(spec: dict, param: str) -> dict:
    schema = spec.get("schema")
    if not isinstance(spec.get("name"), str) or not isinstance(schema, dict):
        raise _invalid(param, f"'{param}' of type json_schema needs a 'name' and a 'schema' object.")
    structure: dict = {"schema": json.dumps(schema, separators=(",", ":")), "name": spec["name"]}
    if isinstance(spec.get("description"), str) and spec["description"]:
        structure["description"] = spec["description"]
    return {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": structure}}}


def _common(body: dict, request: dict) -> None:
    """metadata and service_tier, the same in both APIs."""
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16 or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise _invalid("metadata", "'metadata' must be an object of at most 16 string values.")
        if metadata:
            request["requestMetadata"] = dict(metadata)
    tier = body.get("service_tier")
    if tier is not None and tier != "auto":
        if tier not in SERVICE_TIERS:
            raise _unsupported("service_tier", f"Converse's tiers are {', '.join(SERVICE_TIERS)} (or 'auto')")
        request["serviceTier"] = {"type": SERVICE_TIERS[tier]}


# ---- chat completions -> Converse ---------------------------------------------------------------

_MESSAGE_KEYS = {"system": {"role", "content"}, "developer": {"role", "content"}, "user": {"role", "content"},
                 "assistant": {"role", "content", "tool_calls", "refusal", "audio"},
                 "tool": {"role", "content", "tool_call_id"}}


def _request(body: dict, turns: _Turns, where: str, system: list[dict], max_name, function, choice_name) -> dict:
    """What both APIs' requests become alike: the turns, the system prompt, the inference limits
    and function tools. `function(tool, i)` -> (its name, description, parameters and strict; its
    param path), refusing a tool that is not a function."""
    request: dict = {"messages": turns.checked(where)}
    if system:
        request["system"] = system
    inference = _inference(body, max_name)
    if inference:
        request["inferenceConfig"] = inference
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise _invalid("tools", "'tools' must be an array.")
    specs = []
    for i, tool in enumerate(tools):
        fn, path = function(tool, i)
        specs.append(_tool_spec(fn.get("name"), fn.get("description"), fn.get("parameters"), fn.get("strict"), path))
    config = _tool_config(specs, body.get("tool_choice"), turns, choice_name)
    if config:
        request["toolConfig"] = config
    return request


def chat_request(body: dict) -> dict:
    """Converse's arguments (without modelId) for an OpenAI chat completions request."""
    _refuse_others(body, CHAT_TRANSLATED, CHAT_DEFAULTS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "messages must be a non-empty list.")
    system: list[dict] = []
    turns = _Turns()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, f"'{where}' must be an object.")
        role = message.get("role")
        if role not in _MESSAGE_KEYS:
            raise _unsupported(f"{where}.role", f"role {role!r} is not translated")
        for key, value in message.items():
            if key not in _MESSAGE_KEYS[role] and value is not None:
                raise _unsupported(f"{where}.{key}")
        content = message.get("content")
        if role in ("system", "developer"):
            text = _text_only(content, f"{where}.content", ("text",))
            if text:
                system.append({"text": text})
        elif role == "user":
            turns.add("user", _content_blocks(content, f"{where}.content", ("text",), ("image_url",)))
        elif role == "assistant":
            blocks = _content_blocks(content, f"{where}.content", ("text", "refusal"), ()) if content else []
            if blocks and any(not b.get("text") for b in blocks):
                blocks = [b for b in blocks if b.get("text")]
            for j, call in enumerate(message.get("tool_calls") or []):
                at = f"{where}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or call.get("type", "function") != "function":
                    raise _unsupported(f"{at}.type", "only function tool calls are translated")
                blocks.append({"toolUse": {"toolUseId": _tool_use_id(call.get("id"), f"{at}.id"),
                                           "name": _tool_name(fn.get("name"), f"{at}.function.name"),
                                           "input": _tool_input(fn.get("arguments"), f"{at}.function.arguments")}})
            if not blocks:
                raise _invalid(f"{where}.content", f"'{where}' needs content or tool_calls.")
            turns.add("assistant", blocks)
        else:   # tool
            text = _text_only(content, f"{where}.content", ("text",))
            turns.add("user", [{"toolResult": {"toolUseId": _tool_use_id(message.get("tool_call_id"),
                                                                          f"{where}.tool_call_id"),
                                               "content": [{"text": text}]}}])
    def function(tool, i: int) -> tuple[dict, str]:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise _unsupported(f"tools[{i}].type", "only function tools are translated")
        return fn, f"tools[{i}].function"

    request = _request(body, turns, "messages", system, ("max_completion_tokens", "max_tokens"), function,
                       lambda c: (c.get("function") or {}).get("name") if isinstance(c.get("function"), dict)
                       else None)
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            request["outputConfig"] = _json_schema_format(fmt.get("json_schema") or {}, "response_format.json_schema")
        elif kind != "text":
            raise _unsupported("response_format.type", "only 'text' and 'json_schema' are translated")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("stream_options", "stream_options must be an object.")
    _common(body, request)
    return request


# ---- Responses API -> Converse ------------------------------------------------------------------

def responses_request(body: dict) -> dict:
    """Converse's arguments (without modelId) for an OpenAI Responses API request."""
    _refuse_others(body, RESPONSES_TRANSLATED, RESPONSES_DEFAULTS)
    system: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("instructions", "'instructions' must be a string.")
        if instructions:
            system.append({"text": instructions})
    turns = _Turns()
    given = body.get("input")
    if isinstance(given, str):
        turns.add("user", [{"text": given}])
    elif isinstance(given, list):
        for i, item in enumerate(given):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise _invalid(where, f"'{where}' must be an object.")
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                extra = {k for k, v in item.items() if v is not None} - {"type", "role", "content", "id", "status"}
                if extra:
                    raise _unsupported(f"{where}.{sorted(extra)[0]}")
                if role in ("system", "developer"):
                    text = _text_only(item.get("content"), f"{where}.content", ("input_text",))
                    if text:
                        system.append({"text": text})
                elif role == "user":
                    turns.add("user", _content_blocks(item.get("content"), f"{where}.content", ("input_text",),
                                                      ("input_image",)))
                elif role == "assistant":
                    turns.add("assistant", _content_blocks(item.get("content"), f"{where}.content",
                                                           ("output_text", "input_text", "refusal"), ()))
                else:
                    raise _unsupported(f"{where}.role", f"role {role!r} is not translated")
            elif kind == "function_call":
                turns.add("assistant", [{"toolUse": {
                    "toolUseId": _tool_use_id(item.get("call_id"), f"{where}.call_id"),
                    "name": _tool_name(item.get("name"), f"{where}.name"),
                    "input": _tool_input(item.get("arguments"), f"{where}.arguments")}}])
            elif kind == "function_call_output":
                output = item.get("output")
                text = output if isinstance(output, str) else _text_only(output, f"{where}.output", ("input_text",))
                turns.add("user", [{"toolResult": {"toolUseId": _tool_use_id(item.get("call_id"), f"{where}.call_id"),
                                                   "content": [{"text": text}]}}])
            else:
                raise _unsupported(f"{where}.type", f"input items of type {kind!r} are not translated")
    else:
        raise _invalid("input", "'input' must be a string or a list of input items.")
    def function(tool, i: int) -> tuple[dict, str]:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _unsupported(f"tools[{i}].type", "only function tools are translated")
        return tool, f"tools[{i}]"

    request = _request(body, turns, "input", system, "max_output_tokens", function, lambda c: c.get("name"))
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise _invalid("text", "'text' must be an object.")
        for key, value in text.items():
            if key not in ("format", "verbosity") or (key == "verbosity" and value not in (None, "medium")):
                raise _unsupported(f"text.{key}")
        fmt = text.get("format")
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            request["outputConfig"] = _json_schema_format(fmt, "text.format")
        elif fmt is not None and kind != "text":
            raise _unsupported("text.format.type", "only 'text' and 'json_schema' are translated")
    _common(body, request)
    return request


# ---- Converse -> OpenAI answers ------------------------------------------------------------------

def finish_reason(stop_reason: str | None) -> str:
    return STOP_REASONS.get(stop_reason or "", ("stop", None))[0]


def chat_usage(usage: dict | None) -> dict:
    usage = usage or {}
    cached = int(usage.get("cacheReadInputTokens") or 0)
    prompt = int(usage.get("inputTokens") or 0) + cached + int(usage.get("cacheWriteInputTokens") or 0)
    completion = int(usage.get("outputTokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def responses_usage(usage: dict | None) -> dict:
    chat = chat_usage(usage)
    return {"input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": int((usage or {}).get("cacheWriteInputTokens") or 0)},
            "output_tokens": chat["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat["total_tokens"]}


def _arguments(tool_input: Any) -> str:
    return json.dumps(tool_input if tool_input is not None else {}, separators=(",", ":"))


def _blocks(answer: dict) -> list[dict]:
    message = (answer.get("output") or {}).get("message") or {}
    return [b for b in message.get("content") or [] if isinstance(b, dict)]


def chat_completion(answer: dict, *, model: str, id_: str, created: int) -> dict:
    """A `chat.completion` from a Converse answer (text blocks joined; tool uses as tool_calls)."""
    texts, calls = [], []
    for block in _blocks(answer):
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            calls.append({"id": use.get("toolUseId"), "type": "function",
                          "function": {"name": use.get("name"), "arguments": _arguments(use.get("input"))}})
    message: dict = {"role": "assistant", "content": "".join(texts) if texts or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {"id": id_, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(answer.get("stopReason"))}],
            "usage": chat_usage(answer.get("usage")), "service_tier": "default"}


def _item_ids(id_: str) -> tuple[str, str]:
    core = id_.split("_", 1)[-1]
    return f"msg_{core}", f"fc_{core}"


def response_items(blocks: list[dict], id_: str) -> list[dict]:
    """Responses output items: consecutive text blocks as one message, each tool use a function_call."""
    msg_id, fc_id = _item_ids(id_)
    items: list[dict] = []
    for block in blocks:
        if isinstance(block.get("text"), str):
            if items and items[-1]["type"] == "message":
                items[-1]["content"][0]["text"] += block["text"]
                continue
            items.append({"type": "message", "id": f"{msg_id}_{len(items)}", "role": "assistant",
                          "status": "completed",
                          "content": [{"type": "output_text", "text": block["text"], "annotations": [],
                                       "logprobs": []}]})
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            items.append({"type": "function_call", "id": f"{fc_id}_{len(items)}", "call_id": use.get("toolUseId"),
                          "name": use.get("name"), "arguments": _arguments(use.get("input")),
                          "status": "completed"})
    return items


def _echo_tools(body: dict) -> list[dict]:
    return [{"type": "function", "name": t.get("name"), "description": t.get("description"),
             "parameters": t.get("parameters") or {"type": "object", "properties": {}},
             "strict": t.get("strict") if t.get("strict") is not None else True}
            for t in body.get("tools") or [] if isinstance(t, dict)]


def response_object(answer: dict, *, body: dict, model: str, id_: str, created: int,
                    output: list[dict] | None = None, status: str | None = None) -> dict:
    """A Responses API `response` from a Converse answer (or from a stream's items, `output`)."""
    incomplete = STOP_REASONS.get(answer.get("stopReason") or "", ("stop", None))[1]
    items = output if output is not None else response_items(_blocks(answer), id_)
    if incomplete:
        for item in items:
            if item["type"] == "message":
                item["status"] = "incomplete"
    state = status or ("incomplete" if incomplete else "completed")
    done = state in ("completed", "incomplete")
    response = {"id": id_, "object": "response", "created_at": created, "status": state,
            "completed_at": created if state == "completed" else None, "error": None,
            "incomplete_details": {"reason": incomplete} if state == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None, "model": model, "output": items, "parallel_tool_calls": True,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": False,
            "temperature": body.get("temperature") if body.get("temperature") is not None else 1.0,
            "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice") if body.get("tool_choice") is not None else "auto",
            "tools": _echo_tools(body), "top_logprobs": 0,
            "top_p": body.get("top_p") if body.get("top_p") is not None else 1.0, "truncation": "disabled",
            "metadata": body.get("metadata") or {}}
    if done:   # an object when present: a response still in progress has none yet
        response["usage"] = responses_usage(answer.get("usage"))
    return response


# ---- ConverseStream -> OpenAI stream events ------------------------------------------------------

def _event(event: dict) -> tuple[str, dict]:
    """(event name, its body) of one decoded ConverseStream event."""
    if not isinstance(event, dict) or len(event) != 1:
        return "", {}
    name, body = next(iter(event.items()))
    return name, body if isinstance(body, dict) else {}


class ChatStream:
    """`chat.completion.chunk`s from ConverseStream events: a role chunk, content and tool-call
    argument deltas as they come, a finish chunk (from messageStop), then a usage chunk with no
    choices (from metadata; the gateway shows it only to callers who asked)."""

    def __init__(self, *, model: str, id_: str, created: int) -> None:
        self.base = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
                     "service_tier": "default"}
        self.tools: dict[int, int] = {}       # contentBlockIndex -> tool_calls index
        self.started = False

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _start(self, out: list) -> None:
        if not self.started:
            self.started = True
            out.append(self._chunk({"role": "assistant", "content": "", "refusal": None}))

    def feed(self, event: dict) -> list[dict]:
        name, body = _event(event)
        out: list[dict] = []
        if name == "messageStart":
            self._start(out)
        elif name == "contentBlockStart":
            use = (body.get("start") or {}).get("toolUse")
            if isinstance(use, dict):
                self._start(out)
                index = self.tools.setdefault(int(body.get("contentBlockIndex") or 0), len(self.tools))
                out.append(self._chunk({"tool_calls": [{"index": index, "id": use.get("toolUseId"), "type": "function",
                                                        "function": {"name": use.get("name"), "arguments": ""}}]}))
        elif name == "contentBlockDelta":
            self._start(out)
            delta = body.get("delta") or {}
            if isinstance(delta.get("text"), str) and delta["text"]:
                out.append(self._chunk({"content": delta["text"]}))
            elif isinstance(delta.get("toolUse"), dict):
                block = int(body.get("contentBlockIndex") or 0)
                piece = delta["toolUse"].get("input") or ""
                if block in self.tools and piece:
                    out.append(self._chunk({"tool_calls": [{"index": self.tools[block],
                                                            "function": {"arguments": piece}}]}))
        elif name == "messageStop":
            self._start(out)
            out.append(self._chunk({}, finish_reason(body.get("stopReason"))))
        elif name == "metadata":
            out.append({**self.base, "choices": [], "usage": chat_usage(body.get("usage"))})
        return out


class ResponsesStream:
    """Responses API stream events from ConverseStream events: response.created / .in_progress,
    per output item its added / delta / done events, then response.completed (or .incomplete)
    carrying the whole response with its usage (from metadata)."""

    def __init__(self, *, body: dict, model: str, id_: str, created: int) -> None:
        self.body, self.model, self.id, self.created = body, model, id_, created
        self.msg_id, self.fc_id = _item_ids(id_)
        self.seq = -1
        self.items: list[dict] = []
        self.open: dict[int, int] = {}        # contentBlockIndex -> index in items, while open
        self.stop_reason: str | None = None
        self.started = False

    def _ev(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, **fields, "sequence_number": self.seq}

    def _response(self, status: str, usage: dict | None = None) -> dict:
        answer = {"stopReason": self.stop_reason, "usage": usage}
        items = [dict(i) for i in self.items]
        return response_object(answer, body=self.body, model=self.model, id_=self.id, created=self.created,
                               output=items, status=status)

    def _start(self, out: list) -> None:
        if not self.started:
            self.started = True
            out.append(self._ev("response.created", response=self._response("in_progress")))
            out.append(self._ev("response.in_progress", response=self._response("in_progress")))

    def _open_text(self, block: int, out: list) -> int:
        if block in self.open:
            return self.open[block]
        index = len(self.items)
        item = {"type": "message", "id": f"{self.msg_id}_{index}", "role": "assistant", "status": "in_progress",
                "content": []}
        self.items.append(item)
        self.open[block] = index
        out.append(self._ev("response.output_item.added", output_index=index, item=dict(item, content=[])))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["content"].append(part)
        out.append(self._ev("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part=dict(part)))
        return index

    def _close(self, block: int, out: list) -> None:
        index = self.open.pop(block, None)
        if index is None:
            return
        item = self.items[index]
        if item["type"] == "message":
            part = item["content"][0]
            ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(self._ev("response.output_text.done", **ids, text=part["text"], logprobs=[]))
            out.append(self._ev("response.content_part.done", **ids, part=dict(part)))
        else:
            out.append(self._ev("response.function_call_arguments.done", item_id=item["id"], name=item["name"],
                                output_index=index, arguments=item["arguments"]))
        item["status"] = "completed"
        out.append(self._ev("response.output_item.done", output_index=index, item=json.loads(json.dumps(item))))

    def feed(self, event: dict) -> list[dict]:
        name, body = _event(event)
        out: list[dict] = []
        if name == "messageStart":
            self._start(out)
        elif name == "contentBlockStart":
            self._start(out)
            use = (body.get("start") or {}).get("toolUse")
            block = int(body.get("contentBlockIndex") or 0)
            if isinstance(use, dict) and block not in self.open:
                index = len(self.items)
                item = {"type": "function_call", "id": f"{self.fc_id}_{index}", "call_id": use.get("toolUseId"),
                        "name": use.get("name"), "arguments": "", "status": "in_progress"}
                self.items.append(item)
                self.open[block] = index
                out.append(self._ev("response.output_item.added", output_index=index, item=dict(item)))
        elif name == "contentBlockDelta":
            self._start(out)
            delta = body.get("delta") or {}
            block = int(body.get("contentBlockIndex") or 0)
            if isinstance(delta.get("text"), str):
                index = self._open_text(block, out)
                item = self.items[index]
                if item["type"] == "message" and delta["text"]:
                    item["content"][0]["text"] += delta["text"]
                    out.append(self._ev("response.output_text.delta", item_id=item["id"], output_index=index,
                                        content_index=0, delta=delta["text"], logprobs=[]))
            elif isinstance(delta.get("toolUse"), dict) and block in self.open:
                index = self.open[block]
                item = self.items[index]
                piece = delta["toolUse"].get("input") or ""
                if item["type"] == "function_call" and piece:
                    item["arguments"] += piece
                    out.append(self._ev("response.function_call_arguments.delta", item_id=item["id"],
                                        output_index=index, delta=piece))
        elif name == "contentBlockStop":
            self._close(int(body.get("contentBlockIndex") or 0), out)
        elif name == "messageStop":
            self._start(out)
            for block in list(self.open):
                self._close(block, out)
            self.stop_reason = body.get("stopReason")
        elif name == "metadata":
            self._start(out)
            for block in list(self.open):
                self._close(block, out)
            incomplete = STOP_REASONS.get(self.stop_reason or "", ("stop", None))[1]
            if incomplete:
                for item in self.items:
                    if item["type"] == "message":
                        item["status"] = "incomplete"
            final = self._response("incomplete" if incomplete else "completed", body.get("usage") or {})
            out.append(self._ev("response.incomplete" if incomplete else "response.completed", response=final))
        return out
