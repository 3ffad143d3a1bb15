"""Streamed calls relayed event by event (SSE), counted as they pass, and billed by the documented
rule when cut short.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

from chalicelib.errors import ApiError, UpstreamError
from chalicelib.inference.metered import Hold, tokens
from chalicelib.log import logger
from chalicelib.store.models import LedgerEntry


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

    def __init__(self, upstream, hold: Hold, *, style: str, prompt_tokens: int, client_wants_usage: bool,
                 headers: dict, guard: ChatGuard | None = None, held=None) -> None:
        self.headers = headers
        self._held = held                   # concurrency units (inference/concurrency.Held): kept to the end
        self._guard = guard
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
            out = data
            if self._guard is not None and data.get("choices"):
                out = self._guard.apply(data)            # what of it has passed the guardrail
                if out is None:
                    out = {**data, "choices": []} if data.get("usage") else None
            if out is None:
                return None
            if out.get("usage") and not self._client_wants_usage:
                if not out.get("choices"):
                    return None              # the usage-only chunk the caller did not ask for
                out = {k: v for k, v in out.items() if k != "usage"}
            return raw if out is data else _sse(out)
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
                if self._held is not None:
                    self._held.touch()       # a long stream keeps its lease (a write at most once a minute)
                if out:
                    if self._hold.ttft_ms is None:
                        self._hold.ttft_ms = (time.perf_counter() - self._hold.started) * 1000
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
        try:
            counted = tokens(self._usage, self._style) if self._usage else None
            if counted is None and not (self._ended and self._failure is None):
                # Cut short (or an error event) without usage: what was generated, by the rule above.
                output = max(self._pieces, math.ceil(self._chars / 3))
                self.entry = self._hold.finish((self._prompt_tokens, 0, output), estimated=True,
                                               failure=self._failure)
            else:
                self.entry = self._hold.finish(counted, failure=self._failure)
            if self._guard is not None:
                self._guard.charge()
        finally:
            if self._held is not None:
                self._held.release()


class ChatGuard:
    """A chat stream's output through the team's guardrail: each choice's text is held back until
    its chunk has passed (guardrails.OutputGuard: 1,000 characters, masked where the guardrail
    masks); a blocked chunk is never sent, and its choice ends with `finish_reason:
    "content_filter"`, after which nothing more of the stream is sent but its end. `charge(cost)`:
    the checks' price, put on the ledger when the stream ends."""

    def __init__(self, make_guard, charge) -> None:
        self._make, self._charge = make_guard, charge
        self._guards: dict = {}
        self.cut = False

    def apply(self, data: dict) -> dict | None:
        if self.cut:
            return None
        choices = []
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            guard = self._guards.setdefault(choice.get("index", 0), self._make())
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            text = delta.get("content") if isinstance(delta.get("content"), str) else None
            cleared = guard.feed(text) if text else ""
            if choice.get("finish_reason") and not guard.blocked:
                cleared += guard.finish()
            if guard.blocked:
                self.cut = True
                choices.append({"index": choice.get("index", 0), "delta": {}, "logprobs": None,
                                "finish_reason": "content_filter"})
                continue
            others = {k: v for k, v in delta.items() if k != "content" and v not in (None, "", [])}
            if cleared or others or choice.get("finish_reason"):
                choices.append({**choice, "delta": {**delta, "content": cleared} if text is not None or cleared
                                else delta})
        return {**data, "choices": choices} if choices else None

    def charge(self) -> None:
        cost = sum(g.cost_micro for g in self._guards.values())
        try:
            self._charge(cost)
        except Exception:  # noqa: BLE001 - the call itself is booked; its guard checks must not undo that
            logger.exception("guardrail checks of a stream not charged", extra={"cost_micro": cost})


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
