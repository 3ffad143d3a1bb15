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
                 headers: dict, guard: ChatGuard | ResponsesGuard | None = None, held=None) -> None:
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
            # A guarded response stream sends only what its guard has read (an unreadable event could
            # carry text); chat's `[DONE]` above and its odd events pass as before.
            return None if self._guard is not None and self._style != "chat" else raw
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
        if self._guard is not None:
            events = self._guard.apply(data)         # what of it has passed the guardrail, renumbered
            self._sequence = self._guard.sequence
            return b"".join(f"event: {e['type']}\n".encode() + _sse(e) for e in events) or None
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
            index = choice.get("index", 0)
            guard = self._guards.get(index) or self._guards.setdefault(index, self._make())   # one per choice
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
        _charge_checks(self._guards, self._charge)


class ResponsesGuard:
    """A streamed response's output text through the team's guardrail, as ChatGuard does for chat:
    each output_text part is held back until its chunk has passed (guardrails.OutputGuard, masked
    where the guardrail masks). Every event that repeats the text (`output_text.done`,
    `content_part.done`, `output_item.done`, the final response) carries what was sent instead, never
    the upstream's text. A blocked chunk is never sent: the open part and item are closed with what
    was sent (the item `incomplete`), nothing more of the output is sent, and the stream ends, once
    the upstream has (for its usage), with `response.incomplete` and `incomplete_details.reason:
    "content_filter"` (the Responses API's content filter). Events are renumbered (`sequence`), since
    some are held back or added. Reasoning and tool-call items pass unchecked, as in chat."""

    FINAL = ("response.completed", "response.incomplete", "response.failed")

    def __init__(self, make_guard, charge) -> None:
        self._make, self._charge = make_guard, charge
        self._guards: dict = {}         # (output_index, content_index) -> OutputGuard
        self._fed: dict = {}            # characters of each part given to its guard
        self._sent: dict = {}           # text of each part sent on
        self._items: dict = {}          # output_index -> the item as added
        self._response: dict = {}       # the latest response snapshot (created / in_progress)
        self._cut_at: int | None = None
        self.sequence = -1

    @property
    def cut(self) -> bool:
        return self._cut_at is not None

    def _event(self, data: dict) -> dict:
        self.sequence += 1
        return {**data, "sequence_number": self.sequence}

    def _guard(self, key):
        return self._guards.get(key) or self._guards.setdefault(key, self._make())

    def _feed(self, key, text: str) -> str:
        guard = self._guard(key)
        self._fed[key] = self._fed.get(key, 0) + len(text)
        cleared = guard.feed(text)
        self._sent[key] = self._sent.get(key, "") + cleared
        return cleared

    def _settle(self, key, full) -> str:
        """A part's end: whatever of its full text was not streamed is checked too, then the rest."""
        cleared = ""
        if isinstance(full, str) and len(full) > self._fed.get(key, 0):
            cleared = self._feed(key, full[self._fed.get(key, 0):])
        rest = "" if self._guard(key).blocked else self._guard(key).finish()
        self._sent[key] = self._sent.get(key, "") + rest
        return cleared + rest

    def _blocked(self, key) -> bool:
        return key in self._guards and self._guards[key].blocked

    def apply(self, data: dict) -> list[dict]:
        kind = data.get("type")
        if self.cut:                         # the end (or an upstream error) closes it as cut
            return [self._incomplete(data.get("response"))] if kind in self.FINAL + ("error",) else []
        index = data.get("output_index")
        key = (index, data.get("content_index"))
        if kind in ("response.created", "response.in_progress") and isinstance(data.get("response"), dict):
            self._response = data["response"]
        elif kind == "response.output_item.added" and isinstance(data.get("item"), dict):
            self._items[index] = data["item"]
        elif kind == "response.output_text.delta":
            cleared = self._feed(key, data["delta"]) if isinstance(data.get("delta"), str) else ""
            if self._blocked(key):
                return self._cut(key)
            return [self._event({**data, "delta": cleared, "logprobs": []})] if cleared else []
        elif kind == "response.output_text.done":
            cleared = self._settle(key, data.get("text"))
            if self._blocked(key):
                return self._cut(key)
            out = [self._event({**{k: v for k, v in data.items() if k != "text"}, "type": "response.output_text.delta",
                                "delta": cleared, "logprobs": []})] if cleared else []
            return out + [self._event({**data, "text": self._sent.get(key, ""), "logprobs": []})]
        elif kind == "response.content_part.done" and isinstance(data.get("part"), dict):
            return [self._event({**data, "part": self._part(key, data["part"])})]
        elif kind == "response.output_item.done" and isinstance(data.get("item"), dict):
            return [self._event({**data, "item": self._item(index, data["item"])})]
        elif kind in self.FINAL and isinstance(data.get("response"), dict):
            response = data["response"]
            output = [self._item(i, item) for i, item in enumerate(response.get("output") or [])]
            if self.cut:                     # a part checked only now was blocked
                return [self._incomplete(response)]
            return [self._event({**data, "response": {**response, "output": output}})]
        return [self._event(data)]

    def _part(self, key, part: dict) -> dict:
        if part.get("type") != "output_text":
            return part
        if key not in self._guards and not self.cut:
            self._settle(key, part.get("text"))
            if self._blocked(key):
                self._cut_at = key[0]
        return {**part, "text": self._sent.get(key, ""), "logprobs": []}

    def _item(self, index, item: dict) -> dict:
        if not isinstance(item.get("content"), list):
            return item
        parts = [self._part((index, c), p) if isinstance(p, dict) else p for c, p in enumerate(item["content"])]
        return {**item, "content": parts}

    def _cut(self, key) -> list[dict]:
        """A blocked chunk: the open part and item closed with what was sent."""
        self._cut_at = index = key[0]
        ids = {k: v for k, v in (("item_id", (self._items.get(index) or {}).get("id")), ("output_index", index),
                                  ("content_index", key[1])) if v is not None}
        part = {"type": "output_text", "text": self._sent.get(key, ""), "annotations": [], "logprobs": []}
        item = {**(self._items.get(index) or {"type": "message", "role": "assistant"}), "status": "incomplete",
                "content": [part]}
        return [self._event({"type": "response.output_text.done", **ids, "text": part["text"], "logprobs": []}),
                self._event({"type": "response.content_part.done", **ids, "part": part}),
                self._event({"type": "response.output_item.done", "output_index": index, "item": item})]

    def _incomplete(self, final) -> dict:
        """The stream's end after a block: the response as sent, incomplete for content_filter."""
        response = final if isinstance(final, dict) else self._response
        output = []
        for i, item in enumerate(response.get("output") or [self._items[k] for k in sorted(self._items)]):
            if i > self._cut_at:
                break
            item = self._item(i, item) if isinstance(item, dict) else item
            output.append({**item, "status": "incomplete"} if i == self._cut_at else item)
        return self._event({"type": "response.incomplete", "response": {
            **response, "status": "incomplete", "incomplete_details": {"reason": "content_filter"},
            "output": output, "completed_at": None}})

    def charge(self) -> None:
        _charge_checks(self._guards, self._charge)


def _charge_checks(guards: dict, charge) -> None:
    """A stream's guardrail checks onto the ledger, once its call is booked."""
    cost = sum(g.cost_micro for g in guards.values())
    try:
        charge(cost)
    except Exception:  # noqa: BLE001 - the call itself is booked; its guard checks must not undo that
        logger.exception("guardrail checks of a stream not charged", extra={"cost_micro": cost})


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
