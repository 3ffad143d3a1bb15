"""The one metering path: a call's worst case held against the budget, the served call's ledger
entry, the hold settled at its real cost. Used by the gateway's routes, judges and the eval worker.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chalicelib.domain import ids, pricing
from chalicelib.errors import ApiError
from chalicelib.inference.targets import Target
from chalicelib.log import logger
from chalicelib.spend import budgets, metering
from chalicelib.store.models import LedgerEntry


def tokens(usage: dict | None, style: str) -> tuple[int, int, int] | None:
    if not isinstance(usage, dict):
        return None
    try:
        return count(usage, style)
    except (TypeError, ValueError, AttributeError):
        return None      # malformed usage: treated as missing (the hold is charged)


def count(usage: dict, style: str) -> tuple[int, int, int]:
    if style == "chat":
        details = usage.get("prompt_tokens_details") or {}
        return int(usage.get("prompt_tokens") or 0), int(details.get("cached_tokens") or 0), \
            int(usage.get("completion_tokens") or 0)
    details = usage.get("input_tokens_details") or {}
    return int(usage.get("input_tokens") or 0), int(details.get("cached_tokens") or 0), \
        int(usage.get("output_tokens") or 0)


@dataclass
class Hold:
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


def reserve(team_id: str, key_id: str | None, request_id: str, target: Target, price: pricing.Price, worst: int,
          *, endpoint: str, stream: bool, kind: str = "inference", job_id: str | None = None) -> Hold:
    """Holds `worst` against the team's budget: 429 insufficient_quota (really over) or 503
    (DynamoDB busy) before anything reaches the upstream or the caller."""
    created_ms = ids.now_ms()
    reservation = budgets.reserve(team_id, worst, budgets.call_hold_id(created_ms))
    entry = LedgerEntry(team_id, metering.sort_key(created_ms, request_id), request_id=request_id,
                        key_id=key_id, model=target.requested, upstream_model=target.upstream,
                        alias=target.alias, endpoint=endpoint, reserved_micro=worst, stream=stream,
                        created_at=created_ms // 1000, status=200, kind=kind, job_id=job_id)
    return Hold(reservation, entry, price, worst)


def metered_call(team_id: str, key_id: str | None, request_id: str, target: Target, price: pricing.Price, worst: int,
             *, endpoint: str, stream: bool, invoke, kind: str = "inference", job_id: str | None = None):
    """Holds `worst`, runs `invoke()` -> (result, (input, cached, output) tokens or None), writes
    the ledger and settles the hold at the exact cost: the metering of every plain model call
    rft-hub makes for a team (gateway calls and grader judges alike). Returns (result, entry)."""
    return reserve(team_id, key_id, request_id, target, price, worst, endpoint=endpoint, stream=stream, kind=kind,
                 job_id=job_id).run(invoke)
