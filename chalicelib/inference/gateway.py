"""The inference gateway: OpenAI-compatible calls to base models, tuned models and aliases,
metered per team and held to the team's budget.

Per call: resolve the model (cached), price it (cached), admit the worst case against the
budget (in memory, against this instance's slice: spend/slices.py), forward to Bedrock, then
book the call: its ledger entry (one conditional put, after the answer is sent on the data
plane: `Reply.after`) and its real cost on the slice. In steady state one DynamoDB write per
call, none of it before the answer, no read for auth, prices or models, and no transaction:
daily totals are derived from the ledger later (spend/metering.py).

One metering path for every call: `metered.reserve` (admission, before anything reaches
Bedrock) and its `finish` (ledger, slice) or `fail`. A plain call runs them around one upstream
call; a streamed call (`Stream`) is admitted and opens the upstream before its first byte,
relays Bedrock's events as they come, and books the call when the upstream ends, whatever the
caller does meanwhile (a caller that goes away does not stop the reading: the usage is in the
upstream's last event).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from chalicelib import metrics
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import numbers, pricing
from chalicelib.errors import InvalidRequest, RateLimited
from chalicelib.inference import concurrency, guardrails, metered, ratelimits
from chalicelib.inference import converse as nova_converse
from chalicelib.inference.metered import tokens
from chalicelib.inference.stream import ChatGuard, ResponsesGuard, Stream
from chalicelib.inference.targets import priced
from chalicelib.inference.upstream import open_upstream, send, upstream_deadline
from chalicelib.platform.teams import Principal


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: dict
    # With `defer` (the data plane): the call's booking (ledger entry, slice), to run once the
    # answer is sent and before the invocation ends (dataplane/app.py).
    after: Callable[[], None] | None = None


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


def _check_numbers(body: dict) -> None:
    """Every number the request carries within what OpenAI's document, the upstream and DynamoDB
    accept (a 41-digit max_tokens made a worst case the ledger cannot store): a 400 naming the
    field, before any hold or upstream call."""
    bad = numbers.request_problem(body)
    if bad is not None:
        raise InvalidRequest(f"'{bad[0]}' {bad[1]}.", param=bad[0], code="invalid_value")


def _stream_flag(body: dict) -> bool:
    value = body.get("stream", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest("stream must be true or false.", param="stream")
    return value


def _call(principal: Principal, request_id: str, body: dict, *, endpoint: str, style: str, prompt,
          max_output: int | None, stream: bool, client_wants_usage: bool, choices: int = 1,
          defer: bool = False) -> Reply | Stream:
    """One gateway call: a plain one answered whole (Reply), or a streamed one opened (Stream).
    `defer`: a plain call's booking is left in `Reply.after` for the caller to run once it has
    answered (the data plane); otherwise it is done before returning."""
    target, price = priced(principal.team_id, body.get("model"), allowed=principal.models)
    prompt_tokens = budget_rules.prompt_tokens_estimate(prompt)
    worst = budget_rules.worst_case_micro(price, prompt_tokens, max_output, choices)
    # Rate limits first (no DynamoDB write in steady state either): a refused call costs nothing.
    try:
        ticket = ratelimits.limiter().admit(principal.team_id, principal.key_id, prompt_tokens + choices * (
            max_output or budget_rules.DEFAULT_OUTPUT_CAP), target.requested)
        # In flight at once: one unit per limit, held until the answer is made (a stream: its end).
        try:
            held = concurrency.limiter().acquire(ratelimits.concurrency_limits_for(
                principal.team_id, principal.key_id, target.requested))
        except RateLimited:
            ratelimits.limiter().give_back(ticket)
            raise
    except RateLimited:
        metrics.throttled(principal.team_id, target.upstream)
        raise
    try:
        return _admitted(principal, request_id, body, target, price, ticket, held, endpoint=endpoint, style=style,
                         prompt_tokens=prompt_tokens, worst=worst, stream=stream,
                         client_wants_usage=client_wants_usage, defer=defer)
    except BaseException:
        held.release()
        raise


def _admitted(principal: Principal, request_id: str, body: dict, target, price, ticket, held, *, endpoint: str,
              style: str, prompt_tokens: int, worst: int, stream: bool, client_wants_usage: bool,
              defer: bool) -> Reply | Stream:
    """The call once admitted by its limits; a plain call releases its concurrency units when
    answered, a stream when it ends (Stream._finish)."""
    limit_headers = {**ticket.headers, "x-rft-upstream-model": target.upstream}
    upstream_body = {**body, "model": target.upstream}
    # Amazon Nova is served by Converse, not the OpenAI-compatible API: translated (inference/converse.py).
    converse = nova_converse.converse_call(principal.team_id, target, endpoint, upstream_body)
    # The call's guardrail, looked up once and passed to every check of the call.
    guardrail = guardrails.for_call(principal.team_id, target.alias)
    guard = None
    if stream and guardrail is not None:
        kind = ChatGuard if style == "chat" else ResponsesGuard
        guard = kind(lambda: guardrails.OutputGuard(principal.team_id, target.alias, guardrail=guardrail),
                     lambda cost: metered.charge(principal.team_id, principal.key_id,
                                                 f"{request_id}.guardrail-output", target, cost,
                                                 endpoint=endpoint, kind="guardrail"))
    hold = metered.reserve(principal.team_id, principal.key_id, request_id, target, price, worst,
                           endpoint=endpoint, stream=stream)
    try:
        _guard_input(principal, request_id, target, body, endpoint, guardrail)
    except BaseException as exc:
        hold.fail(exc)
        raise
    if stream:
        try:
            upstream = converse.open_stream(upstream_deadline()) if converse else \
                open_upstream(principal.team_id, endpoint, upstream_body)
        except BaseException as exc:
            hold.fail(exc)
            raise
        return Stream(upstream, hold, style=style, prompt_tokens=prompt_tokens,
                      client_wants_usage=client_wants_usage, headers=limit_headers, guard=guard, held=held)

    def invoke():
        status, content_type, raw = send(principal.team_id, target, endpoint, upstream_body, converse)
        try:
            usage = json.loads(raw).get("usage") if raw else None
        except (ValueError, AttributeError):
            usage = None
        return (status, content_type, raw), tokens(usage, style)

    (status, content_type, raw), entry = hold.run(invoke, defer=defer)
    held.release()
    ticket.finish(entry.input_tokens + entry.output_tokens if entry.outcome == "served" else None)
    if status == 200:
        raw = _guard_output(principal, request_id, target, raw, style, endpoint, guardrail)
    headers = {"x-rft-cost-usd": pricing.usd(entry.cost_micro), **limit_headers}
    return Reply(status, content_type, raw, headers, after=hold.book_later)


def _guard_input(principal: Principal, request_id: str, target, body: dict, endpoint: str, guardrail) -> None:
    """The team's (or the alias's) Bedrock guardrail on the prompt, before anything goes upstream:
    a block is a 400 `content_filter`; the check's own cost is on the ledger (`kind: guardrail`)."""
    verdict = guardrails.check_input(principal.team_id, target.alias, body, endpoint, guardrail=guardrail)
    if verdict is None:
        return
    metered.charge(principal.team_id, principal.key_id, f"{request_id}.guardrail-input", target, verdict.cost_micro,
                   endpoint=endpoint, kind="guardrail")
    if verdict.blocked:
        raise guardrails.blocked_error(verdict)


def _guard_output(principal: Principal, request_id: str, target, raw: bytes, style: str, endpoint: str,
                  guardrail) -> bytes:
    """A plain answer through the guardrail: blocked -> finish_reason content_filter; masked -> masked."""
    answer, cost = guardrails.filter_answer(principal.team_id, target.alias, raw, style, guardrail=guardrail)
    metered.charge(principal.team_id, principal.key_id, f"{request_id}.guardrail-output", target, cost,
                   endpoint=endpoint, kind="guardrail")
    return answer


def chat_completions(principal: Principal, request_id: str, body: dict, *,
                     defer: bool = False) -> Reply | Stream:
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise InvalidRequest("messages must be a non-empty list.", param="messages")
    _check_numbers(body)
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
                 stream=stream, client_wants_usage=wants_usage, choices=choices, defer=defer)


def responses(principal: Principal, request_id: str, body: dict, *, defer: bool = False) -> Reply | Stream:
    if body.get("input") is None:
        raise InvalidRequest("input is required.", param="input")
    _check_numbers(body)
    stream = _stream_flag(body)
    if body.get("background") is True:
        raise InvalidRequest("background responses are not supported.", param="background")
    # Usage always arrives with the Responses API's final event (response.completed).
    return _call(principal, request_id, body, endpoint="/responses", style="responses",
                 prompt=[body.get("instructions"), body["input"], body.get("tools")],
                 max_output=_max_output(body, "max_output_tokens"), stream=stream, client_wants_usage=True,
                 defer=defer)
