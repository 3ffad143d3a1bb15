"""The one metering path: a call admitted against the team's budget for its worst case (in
memory, against this instance's slice: spend/slices.py), the served call's ledger entry, and its
real cost kept on the slice. Used by the gateway's routes, judges and the eval worker.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chalicelib import deadline, metrics
from chalicelib.domain import ids, pricing
from chalicelib.errors import ApiError
from chalicelib.inference.targets import Target
from chalicelib.log import logger
from chalicelib.spend import budgets, ledger, slices
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
    """One metered call between its admission and its ledger entry."""
    admission: slices.Admission
    entry: LedgerEntry
    price: pricing.Price
    worst: int
    key_admission: slices.Admission | None = None     # against the key's own budget, if it has one
    started: float = field(default_factory=time.perf_counter)
    book_later: Callable[[], None] | None = None
    upstream_ms: float | None = None     # a plain call's upstream time (the gateway's own is the rest)
    ttft_ms: float | None = None         # a stream's time to its first event

    def run(self, invoke, *, defer: bool = False):
        """Runs `invoke()` -> (result, (input, cached, output) tokens or None) under the hold;
        returns (result, ledger entry). `defer`: the ledger write is left in `book_later`, for the
        caller to run once the answer is sent (and before its invocation ends)."""
        started = time.perf_counter()
        try:
            result, counted = invoke()
        except BaseException as exc:
            self.fail(exc)
            raise
        finally:
            self.upstream_ms = (time.perf_counter() - started) * 1000
        return result, self.finish(counted, defer=defer)

    def finish(self, counted: tuple[int, int, int] | None, *, estimated: bool = False,
               failure: ApiError | None = None, defer: bool = False) -> LedgerEntry:
        """Prices the call and books it (ledger, then the slice): the reported usage's exact
        cost; without usage, the worst case (never a call at $0); `estimated` counts (a stream
        cut short) are charged at most the worst case. `failure`: an upstream error after the
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
        if defer:
            self.book_later = self.book
        else:
            self.book()
        return entry

    def book(self) -> None:
        """The entry on the ledger (or the dead-letter queue: never lost), then its cost on the
        slice it was admitted against. Never raises."""
        ledger.write(self.entry)
        slices.lender().finish(self.admission, int(self.entry.cost_micro or 0))
        if self.key_admission is not None:
            slices.lender().finish(self.key_admission, int(self.entry.cost_micro or 0))
        metrics.ledger_call(self.entry, self.upstream_ms, self.ttft_ms)

    def fail(self, exc: BaseException) -> None:
        """Nothing was served: an ApiError goes on the ledger at no cost; anything else leaves
        no entry. Either way the worst case goes back to the slice."""
        if isinstance(exc, ApiError):
            self.entry.status, self.entry.outcome = exc.status, "error"
            self.entry.latency_ms = int((time.perf_counter() - self.started) * 1000)
            self.book()
        else:
            slices.lender().finish(self.admission, 0)
            if self.key_admission is not None:
                slices.lender().finish(self.key_admission, 0)


def reserve(team_id: str, key_id: str | None, request_id: str, target: Target, price: pricing.Price, worst: int,
            *, endpoint: str, stream: bool, kind: str = "inference", job_id: str | None = None) -> Hold:
    """Admits the call for `worst`: 429 insufficient_quota (really over), 429 budget_held (the room
    is in other instances' slices) or 503 (DynamoDB busy) before anything reaches the upstream.
    A call that may run longer than a short slice admits (a stream, a long deadline) takes a long one."""
    created_ms = ids.now_ms()
    short = not stream and deadline.remaining() <= budgets.CALL_SECONDS["s"]
    kind_of_slice = "s" if short else "u"
    try:
        admission = slices.lender().admit(team_id, worst, kind_of_slice)
    except budgets.OverBudget:
        metrics.budget_refusal(team_id)
        raise
    key_admission = None
    # A key with a budget of its own: the call must fit it too -- the same in-memory slices, with
    # the key as the budget's owner (no write per call); refused, the team's admission is undone.
    if key_id and budgets.config(budgets.key_owner(team_id, key_id)) is not None:
        try:
            key_admission = slices.lender().admit(budgets.key_owner(team_id, key_id), worst, kind_of_slice)
        except BaseException:
            slices.lender().finish(admission, 0)
            raise
    entry = ledger.new_entry(team_id, created_ms, request_id, admission.hold_id, key_id=key_id, model=target.requested,
                             upstream_model=target.upstream, alias=target.alias, endpoint=endpoint,
                             reserved_micro=worst, stream=stream, status=200, kind=kind, job_id=job_id,
                             key_hold_id=key_admission.hold_id if key_admission else None)
    return Hold(admission, entry, price, worst, key_admission=key_admission)


def metered_call(team_id: str, key_id: str | None, request_id: str, target: Target, price: pricing.Price, worst: int,
                 *, endpoint: str, stream: bool, invoke, kind: str = "inference", job_id: str | None = None):
    """Admits `worst`, runs `invoke()` -> (result, (input, cached, output) tokens or None), and
    books the call at its exact cost: the metering of every plain model call rft-hub makes for a
    team (gateway calls and grader judges alike). Returns (result, entry)."""
    return reserve(team_id, key_id, request_id, target, price, worst, endpoint=endpoint, stream=stream, kind=kind,
                   job_id=job_id).run(invoke)


def charge(team_id: str, key_id: str | None, request_id: str, target: Target, cost_micro: int, *, endpoint: str,
           kind: str) -> LedgerEntry | None:
    """A cost known up front (a guardrail check, priced by what it checked): admitted against the
    budget and booked at once as its own ledger entry. Nothing when it is 0."""
    if cost_micro <= 0:
        return None
    hold = reserve(team_id, key_id, request_id, target, pricing.Price(target.upstream, 0, 0, 0, "", "", False),
                   cost_micro, endpoint=endpoint, stream=False, kind=kind)
    hold.entry.cost_micro = cost_micro
    hold.book()
    return hold.entry
