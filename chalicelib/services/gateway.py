"""The inference gateway: OpenAI-compatible calls to base models, tuned models and aliases,
metered per team and held to the team's budget.

Per call: resolve the model (cached), price it (cached), reserve the worst case (one
conditional write), forward to Bedrock, then record ledger + daily totals + settlement in one
transaction. Two DynamoDB round trips on the warm path; no read for auth, prices or models.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from chalicelib.adapters import bedrock
from chalicelib.config import settings
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import ids, pricing
from chalicelib.errors import ApiError, InvalidRequest, NotFound
from chalicelib.log import logger
from chalicelib.services import budgets, metering, prices, registry
from chalicelib.services.teams import Principal
from chalicelib.store.models import LedgerEntry



def deadline() -> float:
    return min(25.0, settings().bedrock_retry_deadline_seconds)   # API Gateway gives up at 29 s


@dataclass
class Target:
    requested: str
    upstream: str
    base_model: str
    alias: str | None


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: dict


def base_models() -> set[str]:
    return set(pricing.repository_prices())


def resolve(team_id: str, model) -> Target:
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required.", param="model")

    if model in base_models():
        return Target(model, model, model, None)
    found = registry.resolve_cached(team_id, model)
    if found is None:
        raise NotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model",
                       code="model_not_found")
    return Target(model, found["model"], found["base_model"], found.get("alias"))


def _max_output(body: dict, *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be a positive integer.", param=name)
            return value
    return None


def _sse_events(raw: bytes):
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data and data != "[DONE]":
                try:
                    yield json.loads(data)
                except ValueError:
                    continue


def _stream_body(raw: bytes, client_wants_usage: bool) -> tuple[bytes, dict | None]:
    """A complete SSE body for the client, and the usage found (we always ask upstream for it)."""
    usage, out = None, []
    for chunk in _sse_events(raw):
        if chunk.get("usage"):
            usage = chunk["usage"]
            if not client_wants_usage:
                if not chunk.get("choices"):
                    continue            # the usage-only chunk the client did not ask for
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
        out.append("data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n")
    out.append("data: [DONE]\n\n")
    return "".join(out).encode(), usage


def _tokens(usage: dict | None, style: str) -> tuple[int, int, int] | None:
    if not isinstance(usage, dict):
        return None
    if style == "chat":
        details = usage.get("prompt_tokens_details") or {}
        return int(usage.get("prompt_tokens") or 0), int(details.get("cached_tokens") or 0), \
            int(usage.get("completion_tokens") or 0)
    details = usage.get("input_tokens_details") or {}
    return int(usage.get("input_tokens") or 0), int(details.get("cached_tokens") or 0), \
        int(usage.get("output_tokens") or 0)


def _call(principal: Principal, request_id: str, body: dict, *, endpoint: str, style: str, prompt,
          max_output: int | None, stream: bool, client_wants_usage: bool, choices: int = 1) -> Reply:
    team_id = principal.team_id
    target = resolve(team_id, body.get("model"))
    price = prices.price(target.upstream, target.base_model)
    if price is None:
        raise InvalidRequest(f"Model '{target.requested}' has no price, so calls to it cannot be metered; an "
                             "admin can set one with PUT /v1/admin/prices/{model}.", param="model",
                             code="model_not_priced")
    worst = budget_rules.worst_case_micro(price, budget_rules.prompt_tokens_estimate(prompt), max_output, choices)
    reservation = budgets.reserve(team_id, worst)      # 429 insufficient_quota before any upstream call
    upstream_body = {**body, "model": target.upstream}
    entry = LedgerEntry(team_id, f"{int(time.time() * 1000):013d}#{request_id}", request_id=request_id,
                        key_id=principal.key_id, model=target.requested, upstream_model=target.upstream,
                        alias=target.alias, endpoint=endpoint, reserved_micro=worst, stream=stream,
                        created_at=ids.now(), status=200)
    started = time.perf_counter()
    try:
        status, content_type, raw = bedrock.forward(endpoint, upstream_body, deadline())
    except ApiError as err:
        entry.status = err.status
        entry.latency_ms = int((time.perf_counter() - started) * 1000)
        metering.record(reservation, entry)            # releases the reservation; the error is on the ledger
        raise
    entry.latency_ms = int((time.perf_counter() - started) * 1000)
    if stream:
        raw, usage = _stream_body(raw, client_wants_usage)
        content_type = "text/event-stream"
    else:
        usage = json.loads(raw).get("usage") if raw else None
    counted = _tokens(usage, style)
    if counted is None:
        # Never record a call at $0: without usage we charge what was reserved (the worst case).
        logger.warning("upstream reported no usage; charging the reservation", extra={"model": target.upstream})
        entry.cost_micro = worst
    else:
        entry.input_tokens, entry.cached_tokens, entry.output_tokens = counted
        entry.cost_micro = pricing.cost_of_usage(price, *counted)
    try:
        metering.record(reservation, entry)
    except Exception:  # noqa: BLE001 - the caller was served; keep the record in the logs, keep the hold
        logger.exception("ledger write failed; reservation kept", extra={
            "request_id": request_id, "team_id": team_id, "model": target.requested, "cost_micro": entry.cost_micro,
            "input_tokens": entry.input_tokens, "output_tokens": entry.output_tokens})
    headers = {"x-rft-cost-usd": pricing.usd(entry.cost_micro), "x-rft-upstream-model": target.upstream}
    return Reply(status, content_type, raw, headers)


def chat_completions(principal: Principal, request_id: str, body: dict) -> Reply:
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise InvalidRequest("messages must be a non-empty list.", param="messages")
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object.", param="stream_options")
    wants_usage = bool((options or {}).get("include_usage"))
    if stream:
        # Always get usage for streamed calls, so streamed spend is never lost.
        body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
    choices = body.get("n", 1)
    if choices is None:
        choices = 1
    if isinstance(choices, bool) or not isinstance(choices, int) or not 1 <= choices <= 128:
        raise InvalidRequest("n must be an integer from 1 to 128.", param="n")
    return _call(principal, request_id, body, endpoint="/chat/completions", style="chat",
                 prompt=[body["messages"], body.get("tools")],
                 max_output=_max_output(body, "max_completion_tokens", "max_tokens"),
                 stream=stream, client_wants_usage=wants_usage, choices=choices)


def responses(principal: Principal, request_id: str, body: dict) -> Reply:
    if body.get("input") is None:
        raise InvalidRequest("input is required.", param="input")
    if body.get("stream") is True:
        raise InvalidRequest("stream is not supported on /v1/responses through rft-hub yet (API Gateway and "
                             "Lambda cannot stream); call without stream.", param="stream")
    if body.get("background") is True:
        raise InvalidRequest("background responses are not supported.", param="background")
    return _call(principal, request_id, body, endpoint="/responses", style="responses",
                 prompt=[body.get("instructions"), body["input"], body.get("tools")],
                 max_output=_max_output(body, "max_output_tokens"), stream=False, client_wants_usage=False)


