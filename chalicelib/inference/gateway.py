"""The inference gateway: OpenAI-compatible calls to base models, tuned models and aliases,
metered per team and held to the team's budget.

Per call: resolve the model (cached), price it (cached), hold the worst case (one conditional
write on the team's budget item), forward to Bedrock, write the ledger entry (one conditional
put), settle the hold at the exact cost (one write; for a plain call on the data plane, after
the answer is sent: `Reply.after`). Three DynamoDB round trips on the warm path with a budget
(one without), two of them before a plain answer, no read for auth, prices or models, and no
transaction: daily totals are derived from the ledger later (spend/metering.py).

One metering path for every call: `_hold` (reserve, before anything reaches Bedrock) and its
`finish` (ledger, then settle) or `fail`. A plain call runs them around one upstream call
(`_metered`); a streamed call (`Stream`) takes the hold and opens the upstream before its
first byte, relays Bedrock's events as they come, and finishes the hold when the upstream
ends, whatever the caller does meanwhile (a caller that goes away does not stop the reading:
the usage is in the upstream's last event).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from chalicelib import deadline
from chalicelib.adapters import bedrock
from chalicelib.config import settings
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import ids, numbers, pricing
from chalicelib.errors import ApiError, InvalidRequest, NotFound, UpstreamError
from chalicelib.inference import converse as nova_converse
from chalicelib.inference import registry
from chalicelib.log import logger
from chalicelib.platform import teams
from chalicelib.platform.teams import Principal
from chalicelib.spend import budgets, metering, prices
from chalicelib.store.models import LedgerEntry

# The longest a stream may wait for Bedrock's next event (API Gateway ends a stream idle for 5 minutes).
STREAM_IDLE_SECONDS = 60.0


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
    # With defer_settle (the data plane): the call's settlement, to run once the answer is sent.
    # The ledger entry is written before the answer, so a settlement that never runs (a frozen
    # function) is finished by the reconciler from the ledger.
    after: Callable[[], None] | None = None


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


@dataclass
class _Hold:
    """One metered call between its reservation and its ledger entry."""
    reservation: budgets.Reservation
    entry: LedgerEntry
    price: pricing.Price
    worst: int
    started: float = field(default_factory=time.perf_counter)
    settle_later: Callable[[], None] | None = None

    def run(self, invoke, *, defer_settle: bool = False):
        """Runs `invoke()` -> (result, (input, cached, output) tokens or None) under the hold;
        returns (result, ledger entry). `defer_settle`: the ledger is written now and the
        settlement left in `settle_later`, for the caller to run after answering."""
        try:
            result, counted = invoke()
        except BaseException as exc:
            self.fail(exc)
            raise
        return result, self.finish(counted, defer_settle=defer_settle)

    def finish(self, counted: tuple[int, int, int] | None, *, estimated: bool = False,
               failure: ApiError | None = None, defer_settle: bool = False) -> LedgerEntry:
        """Writes the ledger and settles the hold at the call's cost: the reported usage's exact
        cost; without usage, the reservation (never a call at $0); `estimated` counts (a stream
        cut short) are charged at most the reservation. `failure`: an upstream error after the
        answer started (a stream): recorded as an error, with what was generated charged."""
        entry, worst = self.entry, self.worst
        entry.latency_ms = int((time.perf_counter() - self.started) * 1000)
        if failure is not None:
            entry.status, entry.outcome = failure.status, "error"
        if counted is None:
            logger.warning("upstream reported no usage; charging the reservation",
                           extra={"model": entry.upstream_model})
            entry.cost_micro = worst
        else:
            entry.input_tokens, entry.cached_tokens, entry.output_tokens = counted
            entry.cost_micro = pricing.cost_of_usage(self.price, *counted)
            if estimated:
                entry.cost_micro = min(entry.cost_micro, worst)
        if entry.cost_micro > worst:
            logger.warning("call cost more than its hold", extra={"request_id": entry.request_id,
                                                                  "cost": entry.cost_micro, "reserved": worst})
        # never raises: DLQ and reconciler behind it
        on_ledger = metering.record(self.reservation, entry, settle=not defer_settle)
        if defer_settle and on_ledger and self.reservation.hold_id:     # no budget: no hold to settle
            self.settle_later = lambda: metering.settle_call(self.reservation, entry)
        return entry

    def fail(self, exc: BaseException) -> None:
        """Nothing was served: an ApiError goes on the ledger (and releases the hold); anything
        else releases the hold."""
        if isinstance(exc, ApiError):
            self.entry.status, self.entry.outcome = exc.status, "error"
            self.entry.latency_ms = int((time.perf_counter() - self.started) * 1000)
            metering.record(self.reservation, self.entry)   # the failure is on the ledger; the hold is released
        else:
            budgets.settle(self.reservation, 0)             # never leave the hold


def _hold(team_id: str, key_id: str | None, request_id: str, target: Target, price: pricing.Price, worst: int,
          *, endpoint: str, stream: bool, kind: str = "inference", job_id: str | None = None) -> _Hold:
    """Holds `worst` against the team's budget: 429 insufficient_quota (really over) or 503
    (DynamoDB busy) before anything reaches the upstream or the caller."""
    created_ms = ids.now_ms()
    reservation = budgets.reserve(team_id, worst, budgets.call_hold_id(created_ms))
    entry = LedgerEntry(team_id, metering.sort_key(created_ms, request_id), request_id=request_id,
                        key_id=key_id, model=target.requested, upstream_model=target.upstream,
                        alias=target.alias, endpoint=endpoint, reserved_micro=worst, stream=stream,
                        created_at=created_ms // 1000, status=200, kind=kind, job_id=job_id)
    return _Hold(reservation, entry, price, worst)


def _metered(team_id: str, key_id: str | None, request_id: str, target: Target, price: pricing.Price, worst: int,
             *, endpoint: str, stream: bool, invoke, kind: str = "inference", job_id: str | None = None):
    """Holds `worst`, runs `invoke()` -> (result, (input, cached, output) tokens or None), writes
    the ledger and settles the hold at the exact cost: the metering of every plain model call
    rft-hub makes for a team (gateway calls and grader judges alike). Returns (result, entry)."""
    return _hold(team_id, key_id, request_id, target, price, worst, endpoint=endpoint, stream=stream, kind=kind,
                 job_id=job_id).run(invoke)


# ---- streamed calls ------------------------------------------------------------------------------

def _event_blocks(lines) -> Iterator[list[str]]:
    """Server-sent events as the lines of each (a blank line ends an event)."""
    block: list[str] = []
    for line in lines:
        if line == "":
            if block:
                yield block
                block = []
        else:
            block.append(line)
    if block:
        yield block


def _event_data(block: list[str]):
    text = "\n".join(line[5:].lstrip(" ") for line in block if line.startswith("data:"))
    if not text or text == "[DONE]":
        return text or None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _delta_size(style: str, data: dict) -> tuple[int, int]:
    """(non-empty generated pieces, their characters) in one event: what a stream cut short is
    charged by."""
    texts: list = []
    try:
        if style == "chat":
            for choice in data.get("choices") or []:
                delta = choice.get("delta") or {}
                texts += [delta.get(k) for k in ("content", "refusal", "reasoning_content", "reasoning")]
                texts += [(call.get("function") or {}).get("arguments") for call in delta.get("tool_calls") or []]
        elif str(data.get("type", "")).endswith(".delta"):
            texts.append(data.get("delta"))
    except (AttributeError, TypeError):      # an odd event counts for what was read of it
        pass
    texts = [t for t in texts if isinstance(t, str) and t]
    return len(texts), sum(len(t) for t in texts)


class Stream:
    """A streamed call, opened: its worst case held and the upstream's 200 in hand, nothing sent
    yet. Iterating it yields the caller's server-sent events, each as soon as Bedrock sends it;
    the iteration ends with the call on the ledger and its hold settled. Usage comes from the
    upstream's final event (always asked for). If the caller stops iterating (`close()`, a
    disconnect), the rest of the upstream is still read for its usage. If the upstream breaks
    off or sends an error, the caller gets an error event (OpenAI's shape) and the call is
    charged what was generated: the prompt as estimated for the hold plus one output token per
    non-empty piece received or per 3 characters of them, whichever is more, never more than the
    hold."""

    status = 200
    content_type = "text/event-stream"

    def __init__(self, upstream, hold: _Hold, *, style: str, prompt_tokens: int, client_wants_usage: bool,
                 headers: dict) -> None:
        self.headers = headers
        self._upstream, self._hold, self._style = upstream, hold, style
        self._prompt_tokens, self._client_wants_usage = prompt_tokens, client_wants_usage
        self._usage, self._pieces, self._chars = None, 0, 0
        self._ended = False                 # the upstream said it was done (usage or not)
        self._failure: ApiError | None = None
        self._sequence = -1                 # the Responses API's last sequence_number
        self._events = self._relay()
        self.entry: LedgerEntry | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def read_all(self) -> bytes:
        """The whole stream as one body (a caller that cannot stream)."""
        return b"".join(self._events)

    def close(self) -> None:
        """Stops relaying; the upstream is still read to its end and the call metered."""
        self._events.close()
        if self.entry is None:               # never started: nothing has read the upstream yet
            self._drain()
            self._finish()

    # ---- one upstream event -------------------------------------------------------------
    def _account(self, block: list[str]) -> bytes | None:
        """Takes in one upstream event; returns what the caller gets of it (None: nothing)."""
        data = _event_data(block)
        raw = ("\n".join(block) + "\n\n").encode()
        if data == "[DONE]":
            self._ended = True
            return raw
        if not isinstance(data, dict):
            return raw
        pieces, chars = _delta_size(self._style, data)
        self._pieces += pieces
        self._chars += chars
        if isinstance(data.get("sequence_number"), int):
            self._sequence = data["sequence_number"]
        if self._style == "chat":
            if data.get("error"):
                self._failure = self._upstream_error(data.get("error"))
                return raw
            if data.get("usage"):
                self._usage = data["usage"]
                if not self._client_wants_usage:
                    if not data.get("choices"):
                        return None          # the usage-only chunk the caller did not ask for
                    return _sse({k: v for k, v in data.items() if k != "usage"})
            return raw
        kind = data.get("type")
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self._ended = True
            self._usage = (data.get("response") or {}).get("usage") or self._usage
        elif kind == "error":
            self._failure = self._upstream_error(data)
        return raw

    @staticmethod
    def _upstream_error(err) -> ApiError:
        err = err if isinstance(err, dict) else {}
        return UpstreamError(f"Amazon Bedrock: {err.get('message') or 'the stream failed'}",
                             code=err.get("code") if isinstance(err.get("code"), str) else None)

    def _error_event(self, err: ApiError) -> bytes:
        """An upstream that broke off, as OpenAI reports an error in a stream."""
        if self._style == "chat":
            return _sse(err.body())
        self._sequence += 1
        body = err.body()["error"]
        return b"event: error\n" + _sse({"type": "error", "code": body["code"], "message": body["message"],
                                          "param": body["param"], "sequence_number": self._sequence})

    # ---- the relay ----------------------------------------------------------------------
    def _lines(self):
        return self._upstream.iter_lines()

    def _relay(self) -> Iterator[bytes]:
        lines = self._lines()
        try:
            for block in _event_blocks(lines):
                out = self._account(block)
                if out:
                    yield out
        except GeneratorExit:
            self._drain(lines)               # the caller went away: read the rest for its usage
            raise
        except Exception as exc:  # noqa: BLE001 - a broken upstream (reset, idle timeout, bad framing)
            self._failure = self._failure or UpstreamError(
                f"Amazon Bedrock's stream broke off ({type(exc).__name__}); the answer is incomplete.")
            logger.warning("upstream stream broke off", extra={"error": type(exc).__name__,
                                                               "request_id": self._hold.entry.request_id})
            yield self._error_event(self._failure)
        finally:
            self._finish()

    def _drain(self, lines=None) -> None:
        try:
            for block in _event_blocks(lines if lines is not None else self._lines()):
                self._account(block)
        except Exception as exc:  # noqa: BLE001 - cut while nobody was listening: charged as cut
            self._failure = self._failure or UpstreamError(f"Amazon Bedrock's stream broke off ({type(exc).__name__}).")

    def _finish(self) -> None:
        if self.entry is not None:
            return
        try:
            self._upstream.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
        counted = _tokens(self._usage, self._style) if self._usage else None
        if counted is None and not (self._ended and self._failure is None):
            # Cut short (or an error event) without usage: what was generated, by the rule above.
            output = max(self._pieces, math.ceil(self._chars / 3))
            self.entry = self._hold.finish((self._prompt_tokens, 0, output), estimated=True, failure=self._failure)
        else:
            self.entry = self._hold.finish(counted, failure=self._failure)


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _open_upstream(team_id: str, endpoint: str, body: dict):
    """POSTs a streamed request; returns the upstream's open response once Bedrock answered
    200 (429/5xx before that are retried; a final error keeps Bedrock's status and type)."""
    import httpx2

    limit = upstream_deadline()
    until = time.monotonic() + limit

    def op(c):
        # Bedrock's first answer is waited for only as long as the call has left (then a 504,
        # retried within the deadline); from then on the wait between events is the stream's
        # idle limit. The SDK's stream wrapper is used only for its open response.
        first = max(0.5, min(STREAM_IDLE_SECONDS, until - time.monotonic()))
        opened = c.with_options(timeout=httpx2.Timeout(first, connect=min(5.0, first))).post(
            endpoint, body=body, cast_to=object, stream=True)
        _idle_limit(opened.response.request, STREAM_IDLE_SECONDS)
        return opened
    stream = bedrock.call(op, what=f"POST {endpoint} (stream)", deadline_s=limit, passthrough=True,
                          project=teams.mantle_project(team_id))
    return stream.response


def _idle_limit(request, seconds: float) -> None:
    """The read timeout of an opened response's body: httpcore reads it from the request's
    `timeout` extension when the body is first read (after this). Without that extension the
    body keeps the first answer's timeout: shorter, so a stream never waits longer than said."""
    timeouts = getattr(request, "extensions", {}).get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = seconds


def send(team_id: str, target: Target, endpoint: str, body: dict,
         converse: nova_converse.ConverseCall | None = None) -> tuple[int, str, bytes]:
    """One plain upstream call for a team: Converse for a model Converse serves (Amazon Nova),
    otherwise Bedrock's OpenAI-compatible endpoint in the team's project. Returns (status,
    content type, raw body); an upstream error keeps Bedrock's status and type."""
    converse = converse or nova_converse.converse_call(team_id, target, endpoint, body)
    if converse:
        return converse.call(upstream_deadline())
    return bedrock.forward(endpoint, body, upstream_deadline(), project=teams.mantle_project(team_id))


def _call(principal: Principal, request_id: str, body: dict, *, endpoint: str, style: str, prompt,
          max_output: int | None, stream: bool, client_wants_usage: bool, choices: int = 1,
          defer_settle: bool = False) -> Reply | Stream:
    """One gateway call: a plain one answered whole (Reply), or a streamed one opened (Stream).
    `defer_settle`: a plain call's settlement is left in `Reply.after` for the caller to run once
    it has answered (the data plane); otherwise it is done before returning."""
    target, price = priced(principal.team_id, body.get("model"))
    prompt_tokens = budget_rules.prompt_tokens_estimate(prompt)
    worst = budget_rules.worst_case_micro(price, prompt_tokens, max_output, choices)
    upstream_body = {**body, "model": target.upstream}
    # Amazon Nova is served by Converse, not the OpenAI-compatible API: translated (inference/converse.py).
    converse = nova_converse.converse_call(principal.team_id, target, endpoint, upstream_body)
    if stream:
        hold = _hold(principal.team_id, principal.key_id, request_id, target, price, worst, endpoint=endpoint,
                     stream=True)
        try:
            upstream = converse.open_stream(upstream_deadline()) if converse else \
                _open_upstream(principal.team_id, endpoint, upstream_body)
        except BaseException as exc:
            hold.fail(exc)
            raise
        return Stream(upstream, hold, style=style, prompt_tokens=prompt_tokens,
                      client_wants_usage=client_wants_usage, headers={"x-rft-upstream-model": target.upstream})

    def invoke():
        status, content_type, raw = send(principal.team_id, target, endpoint, upstream_body, converse)
        try:
            usage = json.loads(raw).get("usage") if raw else None
        except (ValueError, AttributeError):
            usage = None
        return (status, content_type, raw), _tokens(usage, style)

    hold = _hold(principal.team_id, principal.key_id, request_id, target, price, worst, endpoint=endpoint,
                 stream=False)
    (status, content_type, raw), entry = hold.run(invoke, defer_settle=defer_settle)
    headers = {"x-rft-cost-usd": pricing.usd(entry.cost_micro), "x-rft-upstream-model": target.upstream}
    return Reply(status, content_type, raw, headers, after=hold.settle_later)


def check_judges(team_id: str, spec, param: str) -> None:
    """A grader's judge models resolve exactly as the gateway resolves them for the team (priced
    base models, the team's own tuned models and aliases), and a judge served by Converse has no
    sampling parameter Converse lacks; anything else is a 400 naming it."""
    from chalicelib.domain.graders import judge_specs

    for spec_, where in judge_specs(spec, param):
        model = spec_.get("model")
        try:
            target, _ = priced(team_id, model, f"{where}.model")
        except NotFound:
            raise InvalidRequest(f"The judge model '{model}' does not exist or you do not have access to it.",
                                 param=f"{where}.model", code="invalid_grader") from None
        sampling = spec_.get("sampling_params") or {}
        for ours in sampling:
            try:
                nova_converse.check_translatable(target, "/chat/completions",
                                        _judge_body(target, [{"role": "user", "content": "-"}], {ours: sampling[ours]}))
            except InvalidRequest as err:
                raise InvalidRequest(f"The judge model '{model}': {err.message}", param=f"{where}.sampling_params.{ours}",
                                     code="invalid_grader") from None


# A grader's sampling parameters, as chat completions takes them.
_JUDGE_SAMPLING = (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                   ("max_completions_tokens", "max_tokens"), ("max_completion_tokens", "max_tokens"),
                   ("reasoning_effort", "reasoning_effort"))


def _judge_body(target: Target, messages: list[dict], sampling: dict) -> dict:
    body: dict = {"model": target.upstream, "messages": messages}
    for ours, theirs in _JUDGE_SAMPLING:
        if sampling.get(ours) is not None:
            body[theirs] = sampling[ours]
    return body


def metered_judge(team_id: str, key_id: str | None, request_id: str, model: str, messages: list[dict],
                  sampling: dict, *, job_id: str | None = None) -> tuple[str, dict, LedgerEntry]:
    """One judge call of a grader (score_model, label_model): the model resolved as the team's
    gateway resolves it, sent as the gateway sends it (Converse for Amazon Nova), and metered on
    the ledger as kind `grader`. Returns (reply text, usage, ledger entry); over budget raises
    budgets.OverBudget."""
    target, price = priced(team_id, model, "grader.model")
    body = _judge_body(target, messages, sampling)
    converse = nova_converse.converse_call(team_id, target, "/chat/completions", body)   # refuses before the hold
    worst = budget_rules.worst_case_micro(price, budget_rules.prompt_tokens_estimate(messages),
                                          sampling.get("max_completion_tokens"))

    def invoke():
        _, _, raw = send(team_id, target, "/chat/completions", body, converse)
        try:
            data = json.loads(raw)
            choice = (data.get("choices") or [{}])[0]
            text, usage = (choice.get("message") or {}).get("content") or "", data.get("usage") or {}
        except (ValueError, AttributeError, TypeError, IndexError):
            raise UpstreamError("Amazon Bedrock answered the judge call with an unreadable body.") from None
        return (str(text), usage), _tokens(usage, "chat")

    (text, usage), entry = _metered(team_id, key_id or "grader", request_id, target, price, worst,
                                    endpoint="/chat/completions", stream=False, invoke=invoke, kind="grader",
                                    job_id=job_id)
    return text, usage, entry


def judge(team_id: str, *, key_id: str | None = None, job_id: str | None = None, spent: list | None = None):
    """A `Deps.judge` for one team: every call metered on the ledger (kind `grader`, with the job
    id when there is one) and held to the team's budget; over budget raises JudgeRefused.
    `spent`, when given, collects each call's cost in micro-dollars."""
    from chalicelib.domain.graders import JudgeRefused

    def call(model: str, messages: list[dict], sampling: dict) -> tuple[str, int]:
        try:
            text, usage, entry = metered_judge(team_id, key_id, ids.new_id("judge", 8), model, messages, sampling,
                                               job_id=job_id)
        except budgets.OverBudget as err:
            raise JudgeRefused(err) from None
        if spent is not None:
            spent.append(entry.cost_micro)
        return text, int(usage.get("total_tokens") or 0)
    return call


def chat_completions(principal: Principal, request_id: str, body: dict, *,
                     defer_settle: bool = False) -> Reply | Stream:
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
                 stream=stream, client_wants_usage=wants_usage, choices=choices, defer_settle=defer_settle)


def responses(principal: Principal, request_id: str, body: dict, *, defer_settle: bool = False) -> Reply | Stream:
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
                 defer_settle=defer_settle)


