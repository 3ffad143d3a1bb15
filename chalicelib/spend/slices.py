"""Budget slices: a warm instance admits calls against money it set aside, so a caller never
waits for DynamoDB to be admitted in the common case.

An instance (a process: one Lambda execution environment, or a local server) takes a slice of
its team's remaining budget in one conditional write on the period item (spend/budgets.py
`take`), then admits each call in memory against the slice's free room, for the call's worst
case, as a per-call hold did. A finished call's real cost stays on the slice (`used`), its
worst case is freed. The slice is given back -- `used` moved to spent, the rest to the budget --
when it is renewed (in the same write as the next slice), when the instance goes idle, or at exit.

- Sizing: enough for the worst cases the instance admitted in the last window, at least four
  calls' worth, at most a quarter of what the budget had left at the last take (so no instance
  sits on money another needs). When the budget runs low (a quarter of what is left holds fewer
  than PER_CALL_BELOW worst cases) a slice is one call's worth and is given back right after the
  call: per-call holds, as before slices.
- Renewal ahead of need: after a call (off the caller's clock), if the slice is nearly used or
  its window nearly over, the next is taken then; a caller waits for a take only on an idle or
  new instance, or when the budget runs low.
- Nothing can pass the limit: every admitted call's worst case is inside a slice, and slices
  are carved out of the limit by the conditional write.
- A slice never given back (a frozen or killed instance) is closed by the reconciler once every
  call it could have admitted has ended (budgets.closable_at): settled at what the ledger holds
  for it (spend/metering.py `close_expired`).
- A lowered budget: a slice taken under another budget setting admits nothing more once this
  instance sees the new setting (within the config cache's 30 s); its calls in flight end on it.
- Shards: once an instance sees RFT_BUDGET_ROOT_SLICES slices open on the period item, it carves
  its slices from one shard item of the team's budget instead (spend/shards.py: granted by the
  period item, rebalanced through it), so a team's slice writes spread over many partition keys.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from pynamodb.exceptions import PynamoDBException

from chalicelib import deadline
from chalicelib.domain import budget as rules
from chalicelib.domain import ids, pricing
from chalicelib.errors import ApiError, RateLimited
from chalicelib.log import logger
from chalicelib.spend import budgets, metering, shards

PER_CALL_BELOW = 8        # when a quarter of what is left holds fewer worst cases, slices are per call
SPENT_SECONDS = 1.0       # a budget found without room is believed so this long (no write per refusal)
RENEW_AHEAD_SECONDS = 5   # renew a slice this long before its window ends
MIN_CALLS = 4             # a slice holds at least this many worst cases (outside low water)
GRANT_SLICES = 4          # a shard is granted room for this many of the slices asking (fewer grant writes)


def idle_seconds() -> float:
    """A slice unused this long is given back by the instance's timer (long-running processes;
    a frozen Lambda environment gives it back when it thaws, or the reconciler closes it)."""
    return float(os.environ.get("RFT_SLICE_IDLE_SECONDS", "10"))


class BudgetHeld(RateLimited):
    """The room this call needs is set aside by other instances' slices, which give it back
    within seconds (their window, their idle timer, or the reconciler): retryable."""
    code = "budget_held"


@dataclass(eq=False)
class Slice:
    team_id: str
    period: str
    hold_id: str
    amount: int
    setting: tuple            # the budget setting it was taken under
    admit_until: float        # unix seconds
    per_call: bool = False    # low water: given back as soon as its calls are done
    inflight: int = 0         # worst cases of admitted calls not yet finished
    calls: int = 0
    used: int = 0             # real cost of finished calls
    retired: bool = False     # admits nothing more; given back when its calls are done
    spent_seen: int = 0       # the period's spend when it was taken
    returning: bool = False
    last_used: float = field(default_factory=time.monotonic)
    pk: str = ""              # the item it is carved from: the team's root, or a shard (spend/shards.py)

    def free(self) -> int:
        return self.amount - self.used - self.inflight


@dataclass
class Admission:
    """One call admitted: `hold_id` goes on its ledger entry (None: the team has no budget)."""
    team_id: str
    hold_id: str | None
    worst: int
    slice: Slice | None = None


def _setting(cfg) -> tuple:
    return (int(cfg.limit_micro), float(cfg.updated_at or 0))


class Lender:
    """The slices of one process, per team and kind (`s`: calls of at most 30 s; `u`: streams
    and other calls of up to 15 minutes). Thread-safe."""

    def __init__(self, idle_timer: bool = True) -> None:
        """`idle_timer`: give idle slices back from a thread (off: an instance that freezes or dies)."""
        self._idle_timer = idle_timer
        self._lock = threading.Lock()
        self._current: dict[tuple[str, str], Slice] = {}
        self._draining: list[Slice] = []                  # retired, or their give-back failed
        self._taking: defaultdict = defaultdict(threading.Lock)
        self._demand: dict[tuple[str, str], tuple[float, int]] = {}    # since, worst cases admitted
        self._committed: dict[str, int] = {}               # the budget's committed at the last take
        self._no_room: dict[str, tuple[float, int, tuple]] = {}   # team -> (until, room seen, setting)
        self._announced: dict[tuple[str, str], set] = {}            # thresholds this instance announced
        self._taking_ids: set[str] = set()                            # slice ids being taken now
        self._shard: dict[str, int] = {}             # team -> this instance's shard, once the root is busy
        self._shard_room: dict[str, int] = {}        # team -> its shard's free room at the last take
        self._timer: threading.Thread | None = None

    # ---- admitting ------------------------------------------------------------------------------

    def admit(self, team_id: str, worst: int, kind: str = "s") -> Admission:
        """Admits a call of worst case `worst` (micro-USD), or raises 429 insufficient_quota (the
        budget has no room), 429 budget_held (the room is in other instances' slices, retry) or
        503 (DynamoDB busy, only when a slice must be taken now)."""
        cfg = budgets.config(team_id)
        if cfg is None:
            return Admission(team_id, None, worst)
        period = rules.period_of(ids.now())
        if worst > cfg.limit_micro:
            raise budgets.over_budget(worst, cfg, period)
        key = (team_id, kind)
        admitted = self._admit_now(key, worst, cfg, period)
        if admitted:
            return admitted
        self._refuse_if_spent(team_id, worst, cfg, period)
        with self._taking[key]:         # one thread takes; the others admit against what it took
            admitted = self._admit_now(key, worst, cfg, period)
            if admitted:
                return admitted
            self._refuse_if_spent(team_id, worst, cfg, period)     # found so while this thread waited
            return self._renew(key, cfg, period, worst)

    def _refuse_if_spent(self, team_id: str, worst: int, cfg, period: str) -> None:
        """Refused a moment ago with this little room: an exhausted team's calls are refused
        without a write each on its period item (they would throttle it for everyone)."""
        until, room, setting = self._no_room.get(team_id, (0.0, 0, ()))
        if time.monotonic() < until and worst > room and setting == _setting(cfg):
            raise budgets.over_budget(worst, cfg, period)

    def _admit_now(self, key, worst: int, cfg, period: str) -> Admission | None:
        with self._lock:
            s = self._current.get(key)
            if s is None or not self._usable(s, cfg, period) or s.free() < worst:
                return None
            s.inflight += worst
            s.calls += 1
            s.last_used = time.monotonic()
            since, total = self._demand.get(key, (time.monotonic(), 0))
            self._demand[key] = (since, total + worst)
            return Admission(key[0], s.hold_id, worst, s)

    def _size(self, key, cfg, worst: int) -> tuple[int, bool]:
        """(amount, per call) for the next slice."""
        room = cfg.limit_micro - self._committed.get(key[0], 0) + self._shard_room.get(key[0], 0)
        if room // 4 < PER_CALL_BELOW * worst:
            return worst, True
        since, total = self._demand.pop(key, (time.monotonic(), 0))
        rate = total / max(1.0, time.monotonic() - since)
        want = max(MIN_CALLS * worst, int(rate * budgets.SLICE_WINDOW_SECONDS * 1.25))
        return max(worst, min(want, room // 4)), False

    def _renew(self, key, cfg, period: str, worst: int) -> Admission | None:
        """Takes the next slice -- giving the current one back in the same write when no call is
        on it -- and admits `worst` against it (0: a renewal ahead of need, nothing admitted)."""
        team_id, kind = key
        amount, per_call = self._size(key, cfg, worst)
        n = self._shard_of(team_id)
        pk = team_id if n is None else shards.pk(team_id, n)
        with self._lock:
            old = self._current.get(key)
            release = None
            if old is not None and old.period == period and not old.calls and not old.returning and old.pk == pk:
                old.returning = True                  # admits nothing while it is being given back
                release = (old.hold_id, old.amount, old.used)

        def attempt(size: int):
            nonlocal release, old
            slice_id = budgets.slice_id(kind, ids.now_ms())
            with self._lock:
                self._taking_ids.add(slice_id)        # ours, even before it is installed
            try:
                return self._take(team_id, cfg, period, slice_id, size, release, n)
            except budgets.Released:                  # the reconciler closed it from the ledger already
                self._drop(key, old)
                old = release = None
                return self._take(team_id, cfg, period, slice_id, size, None, n)
            finally:
                with self._lock:
                    self._taking_ids.discard(slice_id)

        try:
            res = attempt(amount)
            if res is None and worst and amount > worst:
                amount, per_call = worst, True
                res = attempt(worst)
            if res is None and worst:
                if release is not None:               # no room even with it: give it back on its own
                    self._settle(old)
                    self._drop(key, old)
                    old = release = None
                # Slices that surely have no call left are closed from the ledger, then once more.
                if metering.close_expired(team_id, period):
                    res = attempt(worst)
                # Room freed meanwhile (calls of this instance that ended since): try again.
                for _ in range(3):
                    if res is not None or self._room_now(team_id, cfg, period) < worst:
                        break
                    res = attempt(worst)
        except BaseException:
            if release is not None:
                old.returning = False
            raise
        if res is None:
            if release is not None:
                old.returning = False
            if old is not None and not self._usable(old, cfg, period):
                self._retire(key, old)
            if worst:
                raise self._refusal(team_id, cfg, period, worst)
            return None
        if res.pk == team_id:
            self._committed[team_id] = res.committed_after
            if shards.count() > 1 and res.holds_after >= shards.root_slices_max() and team_id not in self._shard:
                self._shard[team_id] = shards.pick()      # the root is busy: this instance's next slices on a shard
        else:
            self._shard_room[team_id] = res.room_after
        new = Slice(team_id, period, res.hold_id, amount, _setting(cfg),
                    time.time() + (1 if per_call else budgets.SLICE_WINDOW_SECONDS), per_call=per_call,
                    spent_seen=res.spent_after, pk=res.pk or team_id)
        self._ensure_timer()
        with self._lock:
            if old is not None:
                if self._current.get(key) is old:
                    del self._current[key]
                old.retired = True
                if release is None:
                    self._draining.append(old)        # given back when its last call ends
            self._current[key] = new
            if worst:
                new.inflight, new.calls = worst, 1
        if old is not None and release is None:
            self._give_back_if_done(old)
        return Admission(team_id, new.hold_id, worst, new) if worst else None

    def _shard_of(self, team_id: str) -> int | None:
        """This instance's shard of the team's budget, or None (slices from the root)."""
        if team_id not in self._shard and shards.count() > 1 and shards.root_slices_max() == 0:
            self._shard[team_id] = shards.pick()
        return self._shard.get(team_id)

    def _take(self, team_id: str, cfg, period: str, slice_id: str, size: int, release, n: int | None):
        """A slice from the root (n None) or from shard n; a shard without room is granted more
        by the root, and when the root has none, the other shards' free room is reclaimed first."""
        if n is None:
            return budgets.take(team_id, cfg, period, slice_id, size, release)
        pk = shards.pk(team_id, n)
        res = budgets.take(team_id, cfg, period, slice_id, size, release, pk=pk)
        if res is not None:
            return res
        root_room = max(0, cfg.limit_micro - self._committed.get(team_id, 0))
        want = max(size, min(GRANT_SLICES * size, root_room // shards.count()))
        for amount in dict.fromkeys((want, size)):   # a share for several slices, else just this one
            if self._grant(team_id, cfg, period, n, amount):
                res = budgets.take(team_id, cfg, period, slice_id, size, release, pk=pk)
                if res is not None:
                    return res
        # The root has no room: the free room other shards hold comes back to it, then a grant.
        if shards.reclaim(team_id, cfg, period) and self._grant(team_id, cfg, period, n, size):
            return budgets.take(team_id, cfg, period, slice_id, size, release, pk=pk)
        return None

    def _grant(self, team_id: str, cfg, period: str, n: int, amount: int) -> bool:
        seen = shards.grant(team_id, cfg, period, n, amount)
        if seen is not None:
            self._committed[team_id] = seen + amount       # sizing: what the root has left
        return seen is not None

    @staticmethod
    def _usable(s: Slice, cfg, period: str) -> bool:
        return not s.retired and not s.returning and s.period == period and s.setting == _setting(cfg) \
            and time.time() < s.admit_until

    @staticmethod
    def _room_now(team_id: str, cfg, period: str) -> int:
        return budgets.free_room(cfg, budgets.period_item(team_id, period))

    def _refusal(self, team_id: str, cfg, period: str, worst: int) -> ApiError:
        item = budgets.period_item(team_id, period)
        room = budgets.free_room(cfg, item)
        with self._lock:
            mine = {s.hold_id for s in (*self._current.values(), *self._draining)} | self._taking_ids
        others = {h: m for h, m in budgets.open_holds(item).items() if budgets.is_slice(h) and h not in mine}
        if not others or room + sum(others.values()) < worst:
            self._no_room[team_id] = (time.monotonic() + SPENT_SECONDS, max(0, room), _setting(cfg))
            return budgets.over_budget(worst, cfg, period)
        soonest = min(budgets.hold_created_ms(h) / 1000 + budgets.SLICE_WINDOW_SECONDS for h in others)
        wait = int(min(budgets.SLICE_WINDOW_SECONDS, max(1.0, min(soonest - time.time(), idle_seconds()))))
        keyed = budgets.owner_key(team_id)
        whose = f"API key {keyed[1]}'s budget" if keyed else "the team's budget"
        return BudgetHeld(f"${pricing.usd(worst)} of {whose} is needed for this request and other "
                          f"instances of rft-hub have it set aside for their calls; they give back what they do "
                          f"not use within seconds. Retry after {wait} s.", headers={"Retry-After": str(wait)})

    # ---- finishing and giving back --------------------------------------------------------------

    def finish(self, admission: Admission, cost_micro: int) -> None:
        """After the call's ledger entry is written (or dead-lettered): its real cost stays on the
        slice. Gives back a retired slice whose last call this was, and renews ahead of need.
        Never raises: what cannot be written now is given back later, or closed by the reconciler."""
        s = admission.slice
        if s is None:
            return
        key = (s.team_id, s.hold_id[0])
        with self._lock:
            s.inflight -= admission.worst
            s.calls -= 1
            s.used += cost_micro
            ahead = (self._current.get(key) is s and not s.retired and not s.per_call and
                     (s.free() < s.amount // 4 or time.time() > s.admit_until - RENEW_AHEAD_SECONDS))
        try:
            self._announce(s)           # before a per-call slice's give-back, which announces too
        except (ApiError, PynamoDBException) as exc:
            logger.warning("threshold announcement deferred", extra={"team_id": s.team_id,
                                                                     "error": type(exc).__name__})
        if s.per_call:
            self._retire(key, s)        # its give-back never raises
        try:
            if ahead and self._taking[key].acquire(blocking=False):
                try:
                    cfg = budgets.config(s.team_id)
                    if cfg is not None and self._current.get(key) is s:
                        self._renew(key, cfg, rules.period_of(ids.now()), 0)
                finally:
                    self._taking[key].release()
            self._give_back_if_done(s)
        except (ApiError, PynamoDBException) as exc:
            logger.warning("slice renewal deferred", extra={"team_id": s.team_id, "error": type(exc).__name__})

    def _announce(self, s: Slice) -> None:
        """Thresholds the period's spend has surely reached -- what it was when the slice was taken
        plus what the slice's calls cost since -- announced now, after the call's answer, not when
        the slice is given back (budgets.announce_thresholds: once per threshold per period)."""
        cfg = budgets.config(s.team_id)
        if cfg is None or not cfg.thresholds:
            return
        bound, done = s.spent_seen + s.used, self._announced.setdefault((s.team_id, s.period), set())
        due = rules.crossed(cfg.thresholds, cfg.limit_micro, -1, bound, list(done))
        if due:
            budgets.announce_thresholds(budgets.Reservation(s.team_id, s.period, 0), bound, list(done))
            done.update(due)

    def _retire(self, key, s: Slice) -> None:
        """Admits nothing more; given back when its last call ends."""
        with self._lock:
            if self._current.get(key) is s:
                del self._current[key]
            s.retired = True
            if s not in self._draining:
                self._draining.append(s)
        self._give_back_if_done(s)

    def _drop(self, key, s: Slice | None) -> None:
        """No longer this instance's to give back (given back or closed)."""
        with self._lock:
            if s is not None and self._current.get(key) is s:
                del self._current[key]
            if s in self._draining:
                self._draining.remove(s)

    @staticmethod
    def _settle(s: Slice) -> bool:
        budgets.settle(budgets.Reservation(s.team_id, s.period, s.amount, s.hold_id, pk=s.pk or s.team_id), s.used)
        return True

    def _give_back_if_done(self, s: Slice) -> None:
        with self._lock:
            if not s.retired or s.calls or s.returning or s not in self._draining:
                return
            s.returning = True
        try:
            self._settle(s)
            self._drop((s.team_id, s.hold_id[0]), s)
            self._no_room.pop(s.team_id, None)          # what it did not use is room again
        except (ApiError, PynamoDBException) as exc:
            logger.warning("slice give-back deferred", extra={"hold_id": s.hold_id, "error": type(exc).__name__})
        finally:
            s.returning = False

    def _slices(self) -> list[Slice]:
        with self._lock:
            return [*self._current.values(), *self._draining]

    def give_back_idle(self, idle: float | None = None) -> int:
        """Gives back every slice unused for `idle` seconds (default: idle_seconds()) whose calls
        are done, and retries give-backs that failed. Returns how many are still held."""
        idle = idle_seconds() if idle is None else idle
        now = time.monotonic()
        with self._lock:
            idle_ones = [(k, s) for k, s in self._current.items() if not s.calls and now - s.last_used >= idle]
            draining = list(self._draining)
        for key, s in idle_ones:
            self._retire(key, s)
        for s in draining:
            self._give_back_if_done(s)
        return len(self._slices())

    def give_back_all(self) -> int:
        return self.give_back_idle(0)

    def _ensure_timer(self) -> None:
        if self._timer is None and self._idle_timer:
            self._timer = threading.Thread(target=self._tick, daemon=True, name="slice-idle")
            self._timer.start()

    def _tick(self) -> None:
        while True:
            time.sleep(max(1.0, idle_seconds() / 2))
            try:
                self.give_back_idle()
            except Exception:  # noqa: BLE001 - the timer must outlive one bad pass
                logger.exception("slice idle pass failed")


_lender = Lender()


@atexit.register
def _at_exit() -> None:
    """A process that ends gives its slices back, briefly: what it cannot write now is closed
    by the reconciler."""
    logging.raiseExceptions = False     # the log stream may be closed already
    try:
        with deadline.running(3.0):
            _lender.give_back_all()
    except Exception:  # noqa: BLE001 - exiting: nothing more can be done here
        pass


def lender() -> Lender:
    """This process's slices."""
    return _lender
