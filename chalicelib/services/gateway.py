"""The inference gateway: OpenAI-compatible calls to base models, tuned models and aliases,
metered per team and held to the team's budget.

Per call: resolve the model (cached), price it (cached), hold the worst case (one conditional
write on the team's budget item), forward to Bedrock, write the ledger entry (one conditional
put), settle the hold at the exact cost (one write). Three DynamoDB round trips on the warm path
with a budget (one without), no read for auth, prices or models, and no transaction: daily
totals are derived from the ledger later (services/metering.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from chalicelib import deadline
from chalicelib.adapters import bedrock
from chalicelib.config import settings
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import ids, pricing
from chalicelib.errors import ApiError, InvalidRequest, NotFound
from chalicelib.log import logger
from chalicelib.services import budgets, metering, prices, registry
from chalicelib.services.teams import Principal
from chalicelib.store.models import LedgerEntry



def upstream_deadline() -> float:
    """Seconds the upstream call may take: what the request has left (API Gateway gives up at
    29 s), keeping time to write the bill afterwards."""
    return max(0.5, min(settings().bedrock_retry_deadline_seconds, deadline.remaining() - 1.0))


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


def resolve(team_id: str, model, param: str = "model") -> Target:
    if not isinstance(model, str) or not model:
        raise InvalidRequest(f"{param} is required.", param=param)
    if len(model) > 256:
        raise InvalidRequest(f"{param} is longer than 256 characters.", param=param)
    if model in base_models():
        return Target(model, model, model, None)
    found = registry.resolve_cached(team_id, model)
    if found is None:
        raise NotFound(f"The model '{model}' does not exist or you do not have access to it.", param=param,
                       code="model_not_found")
    return Target(model, found["model"], found["base_model"], found.get("alias"))


def _max_output(body: dict, *names: str) -> int | None:
    """The largest output limit the caller set under any of `names`: the upstream may honour
    any one of them, so the hold must cover the largest (max_completion_tokens: 1 with
    max_tokens: 100000 reserves for 100000)."""
    limits = []
    for name in names:
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be a positive integer.", param=name)
            limits.append(value)
    return max(limits) if limits else None


def _stream_flag(body: dict) -> bool:
    value = body.get("stream", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest("stream must be true or false.", param="stream")
    return value


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
    try:
        return _count(usage, style)
    except (TypeError, ValueError, AttributeError):
        return None      # malformed usage: treated as missing (the hold is charged)


def _count(usage: dict, style: str) -> tuple[int, int, int]:
    if style == "chat":
        details = usage.get("prompt_tokens_details") or {}
        return int(usage.get("prompt_tokens") or 0), int(details.get("cached_tokens") or 0), \
            int(usage.get("completion_tokens") or 0)
    details = usage.get("input_tokens_details") or {}
    return int(usage.get("input_tokens") or 0), int(details.get("cached_tokens") or 0), \
        int(usage.get("output_tokens") or 0)


def priced(team_id: str, model, param: str = "model") -> tuple[Target, pricing.Price]:
    target = resolve(team_id, model, param)
    price = prices.price(target.upstream, target.base_model)
    if price is None:
        raise InvalidRequest(f"Model '{target.requested}' has no price, so calls to it cannot be metered; an "
                             "admin can set one with PUT /v1/admin/prices/{model}.", param=param,
                             code="model_not_priced")
    return target, price


def _metered(team_id: str, key_id: str | None, request_id: str, target: Target, price: pricing.Price, worst: int,
             *, endpoint: str, stream: bool, invoke, kind: str = "inference", job_id: str | None = None):
    """Holds `worst`, runs `invoke()` -> (result, (input, cached, output) tokens or None), writes
    the ledger and settles the hold at the exact cost: the one metering path of every model call
    rft-hub makes for a team (gateway calls and grader judges alike). Returns (result, entry)."""
    created_ms = ids.now_ms()
    # 429 insufficient_quota (really over) or 503 (DynamoDB busy) before any upstream call.
    reservation = budgets.reserve(team_id, worst, budgets.call_hold_id(created_ms))
    entry = LedgerEntry(team_id, metering.sort_key(created_ms, request_id), request_id=request_id,
                        key_id=key_id, model=target.requested, upstream_model=target.upstream,
                        alias=target.alias, endpoint=endpoint, reserved_micro=worst, stream=stream,
                        created_at=created_ms // 1000, status=200, kind=kind, job_id=job_id)
    started = time.perf_counter()
    try:
        result, counted = invoke()
    except ApiError as err:
        entry.status, entry.outcome = err.status, "error"
        entry.latency_ms = int((time.perf_counter() - started) * 1000)
        metering.record(reservation, entry)            # the failure is on the ledger; the hold is released
        raise
    except BaseException:
        budgets.settle(reservation, 0)                 # nothing was served: never leave the hold
        raise
    entry.latency_ms = int((time.perf_counter() - started) * 1000)
    if counted is None:
        # Never record a call at $0: without usage we charge what was reserved (the worst case).
        logger.warning("upstream reported no usage; charging the reservation", extra={"model": target.upstream})
        entry.cost_micro = worst
    else:
        entry.input_tokens, entry.cached_tokens, entry.output_tokens = counted
        entry.cost_micro = pricing.cost_of_usage(price, *counted)
    if entry.cost_micro > worst:
        logger.warning("call cost more than its hold", extra={"request_id": request_id, "cost": entry.cost_micro,
                                                              "reserved": worst})
    metering.record(reservation, entry)                # never raises: DLQ and reconciler behind it
    return result, entry


def _call(principal: Principal, request_id: str, body: dict, *, endpoint: str, style: str, prompt,
          max_output: int | None, stream: bool, client_wants_usage: bool, choices: int = 1) -> Reply:
    target, price = priced(principal.team_id, body.get("model"))
    worst = budget_rules.worst_case_micro(price, budget_rules.prompt_tokens_estimate(prompt), max_output, choices)

    def invoke():
        status, content_type, raw = bedrock.forward(endpoint, {**body, "model": target.upstream},
                                                    upstream_deadline())
        if stream:
            raw, usage = _stream_body(raw, client_wants_usage)
            content_type = "text/event-stream"
        else:
            try:
                usage = json.loads(raw).get("usage") if raw else None
            except (ValueError, AttributeError):
                usage = None
        return (status, content_type, raw), _tokens(usage, style)

    (status, content_type, raw), entry = _metered(principal.team_id, principal.key_id, request_id, target, price,
                                                  worst, endpoint=endpoint, stream=stream, invoke=invoke)
    headers = {"x-rft-cost-usd": pricing.usd(entry.cost_micro), "x-rft-upstream-model": target.upstream}
    return Reply(status, content_type, raw, headers)


def check_judges(team_id: str, judges: list[tuple[str, str, int]]) -> None:
    """A grader's judge models resolve exactly as the gateway resolves them for the team (priced
    base models, the team's own tuned models and aliases); anything else is a 400 naming it."""
    for model, param, _ in judges:
        try:
            priced(team_id, model, param)
        except NotFound:
            raise InvalidRequest(f"The judge model '{model}' does not exist or you do not have access to it.",
                                 param=param, code="invalid_grader") from None


def judge(team_id: str, *, key_id: str | None = None, job_id: str | None = None, spent: list | None = None):
    """A `Deps.judge` for one team: every call metered on the ledger (kind `grader`, with the job
    id when there is one) and held to the team's budget; over budget raises JudgeRefused.
    `spent`, when given, collects each call's cost in micro-dollars."""
    from chalicelib.domain.graders import JudgeRefused

    def call(model: str, messages: list[dict], sampling: dict) -> tuple[str, int]:
        target, price = priced(team_id, model, "grader.model")
        worst = budget_rules.worst_case_micro(price, budget_rules.prompt_tokens_estimate(messages),
                                              sampling.get("max_completion_tokens"))

        def invoke():
            text, usage = bedrock.judge(target.upstream, messages, sampling, upstream_deadline())
            return (text, int((usage or {}).get("total_tokens") or 0)), _tokens(usage, "chat")

        try:
            result, entry = _metered(team_id, key_id or "grader", ids.new_id("judge", 8), target, price, worst,
                                     endpoint="/chat/completions", stream=False, invoke=invoke, kind="grader",
                                     job_id=job_id)
        except budgets.OverBudget as err:
            raise JudgeRefused(err) from None
        if spent is not None:
            spent.append(entry.cost_micro)
        return result
    return call


def chat_completions(principal: Principal, request_id: str, body: dict) -> Reply:
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise InvalidRequest("messages must be a non-empty list.", param="messages")
    stream = _stream_flag(body)
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
    if _stream_flag(body):
        raise InvalidRequest("stream is not supported on /v1/responses through rft-hub yet (API Gateway and "
                             "Lambda cannot stream); call without stream.", param="stream")
    if body.get("background") is True:
        raise InvalidRequest("background responses are not supported.", param="background")
    return _call(principal, request_id, body, endpoint="/responses", style="responses",
                 prompt=[body.get("instructions"), body["input"], body.get("tools")],
                 max_output=_max_output(body, "max_output_tokens"), stream=False, client_wants_usage=False)


