"""Concurrent-requests limits (issue #29): how many calls of a team, of one of its keys, or of the
team's calls to one model may be in flight at once (`concurrent_requests` in the limits body).

Enforced as the minute limits are (inference/ratelimits.py), with no item written per call in
the common case: each limit has one pool item (in the rate_windows table, key
"<team>#<scope>#concurrent") whose `requests` counts the units every instance has leased and whose
`slices` map holds each instance's lease as "<units>/<lease end, unix s>". An instance leases
units in one conditional write (`ADD requests k` only if `requests <= limit - k`), then admits and
ends calls against them in memory; a call (a stream: until its end) holds one unit. So:

* never more than the limit at once, whatever the number of instances: every unit in use was
  carved from the counter first. The one exception: an instance paused (not crashed) for longer
  than a lease while holding calls -- its lease is reclaimed and the units leased again, so its
  paused calls come on top (at most its units then). A running stream renews its lease as its
  events pass, so a live stream never loses its unit;
* refused early, never late: an instance keeps up to `spare(limit)` (an eighth of the limit)
  unused units leased for the next calls, so other instances may be refused while idle ones keep
  them; idle instances' spares come back when their leases end (LEASE_SECONDS without a call);
* a crashed instance's units come back when its lease ends: the next carve on any instance
  removes expired leases and their units in the same conditional write.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from pynamodb.exceptions import UpdateError

from chalicelib.errors import RateLimited
from chalicelib.log import logger
from chalicelib.store import dynamo
from chalicelib.store.models import RateWindow

LEASE_SECONDS = 120         # a lease not renewed for this long is another instance's to reclaim
RENEW_BEFORE = 60           # a lease with less than this left is renewed when next used
RETRY_AFTER = "1"           # a unit comes free when some call ends: no better time to give


def pool_key(team_id: str, scope: str) -> str:
    return f"{team_id}#{scope}#concurrent"


def spare(limit: int) -> int:
    """Unused units an instance keeps leased for its next calls (0 below 8: give each back)."""
    return limit // 8


def _parse(value) -> tuple[int, int]:
    units, _, until = str(value).partition("/")
    return int(units), int(until or 0)


@dataclass(eq=False)
class _Lease:
    pool: str
    lease_id: str
    limit: int
    units: int = 0              # leased by this instance (the item says f"{units}/{until}")
    until: int = 0
    used: int = 0               # of them, held by calls in flight here

    @property
    def value(self) -> str:
        return f"{self.units}/{self.until}"


class Held:
    """What one call holds: one unit of each pool that applies. `touch()` as the call goes on (a
    stream's events) keeps the leases alive; `release()` (once; repeats are no-ops) at its end."""

    def __init__(self, limiter: ConcurrencyLimiter | None = None) -> None:
        self._limiter = limiter
        self.leases: list[_Lease] = []
        self._released = False

    def touch(self) -> None:
        if self._limiter is not None and not self._released:
            for lease in self.leases:
                self._limiter.renew_if_due(lease)

    def release(self) -> None:
        if self._released or self._limiter is None:
            return
        self._released = True
        for lease in self.leases:
            try:
                self._limiter.release(lease)
            except Exception:  # noqa: BLE001 - the call is done; an unreturned unit comes back at lease end
                logger.exception("concurrency unit not given back", extra={"pool": lease.pool})


class ConcurrencyLimiter:
    """This process's leases. Thread-safe; `clock` lets tests play several instances."""

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._writing: defaultdict = defaultdict(threading.Lock)
        self._leases: dict[str, _Lease] = {}
        self.instance = secrets.token_hex(8)

    def acquire(self, limits: list[tuple[str, str, int]]) -> Held:
        """`limits`: (team_id, scope, limit) of each concurrent-requests limit the call counts
        against. Raises RateLimited (429) when any is full; then nothing stays held."""
        held = Held(self)
        try:
            for team_id, scope, limit in limits:
                held.leases.append(self._acquire_one(pool_key(team_id, scope), scope, limit))
        except BaseException:
            held.release()
            raise
        return held

    def _acquire_one(self, pool: str, scope: str, limit: int) -> _Lease:
        with self._lock:
            lease = self._leases.setdefault(pool, _Lease(pool, self.instance, limit))
            lease.limit = limit
        if self._take_local(lease):
            return lease
        with self._writing[pool]:
            if not self._take_local(lease):
                self._carve(lease, need=True)
                if not self._take_local(lease):
                    who = {"team": "the team"}.get(scope) or (
                        f"the team's calls to {scope[6:]}" if scope.startswith("model:") else "this key")
                    raise RateLimited(f"Concurrency limit reached for {who}: {limit} requests at once. Retry "
                                      "when one of them has finished.",
                                      headers={"Retry-After": RETRY_AFTER}, should_retry=True)
        return lease

    def _take_local(self, lease: _Lease) -> bool:
        with self._lock:
            if lease.used >= min(lease.units, lease.limit) or lease.until - self._clock() < RENEW_BEFORE:
                return False
            lease.used += 1
            return True

    def release(self, lease: _Lease) -> None:
        with self._lock:
            lease.used = max(0, lease.used - 1)
            give = lease.units - lease.used - spare(lease.limit)
        if give > 0:
            with self._writing[lease.pool]:
                self._carve(lease, need=False)

    def renew_if_due(self, lease: _Lease) -> None:
        if lease.until - self._clock() < RENEW_BEFORE and lease.units:
            with self._writing[lease.pool]:
                if lease.until - self._clock() < RENEW_BEFORE:
                    self._carve(lease, need=False)

    # ---- the pool item ---------------------------------------------------------------------
    def _carve(self, lease: _Lease, *, need: bool) -> None:
        """One conditional write on the pool: this instance's lease set to what it needs now (the
        calls in flight, one more if `need`, and its spare), renewed, with every expired lease of
        another instance removed and its units freed. Retried on a race; a full pool leaves the
        lease as it is (the caller is refused)."""
        for _ in range(4):
            now = int(self._clock())
            current = dynamo.get_or_none(RateWindow, lease.pool, what="concurrency read", consistent_read=True)
            if current is None:
                dynamo.put_once(RateWindow(lease.pool, requests=0, tokens=0, slices={}), RateWindow.window,
                                "concurrency pool create")
                continue
            leases = current.slices.as_dict() if current.slices else {}
            mine = leases.get(lease.lease_id)
            with self._lock:
                if mine is not None:
                    lease.units, lease.until = _parse(mine)     # an earlier write that landed counts
                elif lease.units:
                    logger.warning("concurrency lease reclaimed by another instance",
                                   extra={"pool": lease.pool, "units": lease.units, "in_flight": lease.used})
                    lease.units, lease.until = 0, 0
                wanted = lease.used + (1 if need else 0)
                target = min(lease.limit, wanted + spare(lease.limit)) if wanted else 0
            expired = {lid: v for lid, v in leases.items() if lid != lease.lease_id and _parse(v)[1] < now}
            freed = sum(_parse(v)[0] for v in expired.values())
            room = lease.limit - (int(current.requests or 0) - freed - lease.units)
            target = max(min(target, room), lease.used)     # calls in flight keep their units
            delta = target - lease.units
            if delta == 0 and not expired and (not lease.units or lease.until - now >= RENEW_BEFORE):
                return                      # nothing to change or renew (a full pool: no write to refuse)
            until = now + LEASE_SECONDS
            actions = [RateWindow.requests.add(delta - freed)]
            condition = (RateWindow.slices[lease.lease_id] == mine) if mine is not None else \
                RateWindow.slices[lease.lease_id].does_not_exist()
            if delta > 0:
                condition &= RateWindow.requests <= lease.limit - (delta - freed)
            if target or lease.used:
                actions.append(RateWindow.slices[lease.lease_id].set(f"{target}/{until}"))
            elif mine is not None:
                actions.append(RateWindow.slices[lease.lease_id].remove())
            for lid, value in expired.items():
                actions.append(RateWindow.slices[lid].remove())
                condition &= RateWindow.slices[lid] == value
            item = RateWindow(lease.pool)
            try:
                dynamo.call(lambda item=item, a=actions, c=condition: item.update(actions=a, condition=c),
                            idempotent=False, what="concurrency lease")
            except UpdateError as exc:
                if dynamo.is_condition(exc):
                    continue                # another instance moved first: read again
                raise
            with self._lock:
                lease.units, lease.until = target, until if (target or lease.used) else 0
            return


_limiter = ConcurrencyLimiter()


def limiter() -> ConcurrencyLimiter:
    return _limiter
