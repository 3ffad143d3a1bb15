"""The time a request still has, so every wait (retries, upstream calls) fits inside it.

API Gateway gives up on a request at 29 s and Lambda stops a function at its timeout; a
retry loop or a client timeout that ignores them answers nobody. The route wrapper (and
each non-HTTP handler) starts a deadline from the function's remaining time; code that
waits asks `remaining()` and never plans past it.
"""
from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager

API_GATEWAY_SECONDS = 29.0
MARGIN_SECONDS = 1.5          # time kept to write the answer (and the bill) after the last wait
DEFAULT_SECONDS = 25.0        # no Lambda context (tests, scripts): as if behind API Gateway

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("rft_deadline", default=None)


def budget_from_context(context, cap: float = API_GATEWAY_SECONDS) -> float:
    """Seconds usable by this invocation: the function's remaining time, capped (API Gateway)."""
    remaining_ms = None
    getter = getattr(context, "get_remaining_time_in_millis", None)
    if callable(getter):
        try:
            remaining_ms = float(getter())
        except (TypeError, ValueError):
            remaining_ms = None
    seconds = cap if remaining_ms is None else min(cap, remaining_ms / 1000.0)
    return max(0.5, seconds - MARGIN_SECONDS)


@contextmanager
def running(seconds: float):
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining(default: float = DEFAULT_SECONDS) -> float:
    """Seconds left before this request's deadline (never negative)."""
    at = _deadline.get()
    if at is None:
        return default
    return max(0.0, at - time.monotonic())


def at() -> float:
    """The deadline as a time.monotonic() value."""
    return time.monotonic() + remaining()
