"""Budget shards: a team's period item (the root) grants shares of its limit to N shard items, and
slices are carved from a shard, so a team's slice writes spread over N + 1 partition keys.

On AWS one partition key takes about 1,000 write units a second and every write is billed on the
item's size, so the root alone carries about 1,263 instances holding slices (docs/benchmarks.md);
a shard item `<team>#bNN` (same table, its own partition key) carries as many again.

- The root holds each shard's grant as a hold `bNN` (micro-USD), inside its `committed`: the
  sum of grants can never pass the limit, by the root's existing conditional write.
- A shard item: `granted` (= its root hold), `committed` (spent + its slices), `room` (granted -
  committed: what a slice may be carved from), `spent`, `holds` (its slices), the budget
  `setting` its room was last checked under, and `grants` {grant id: ms}, its recent grant ids.
- Every move between the root and a shard (a grant, a give-back of room, spend moved to the
  root) is one two-item transaction whose shard side is conditional on the grant id being new:
  a retry after an unknown outcome finds its id there and is not applied twice. Moves are rare
  (a grant covers several slices), so a transaction's cancellation under concurrency is a retry.
- A slice is carved from a shard by one conditional UpdateItem on the shard alone (`room >= m`
  and the shard's setting is the current one), as from the root (spend/budgets.py `take`).
- A shard without room asks the root for a grant; a root without room takes back the room other
  shards hold (`reclaim`), so a team is refused only when the budget as a whole has none.
- A lowered budget: a shard's room is used only under the setting it was checked under; under a
  new one the shard is re-granted, and the root checks every grant against the new limit.
- The reconciler settles expired slices on shards as on the root, then folds every shard with no
  slice back into the root (`fold_idle`): its room and spend moved there, its grant removed.
"""
from __future__ import annotations

import os
import secrets
import time

from pynamodb.exceptions import TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import ids
from chalicelib.log import logger
from chalicelib.store import dynamo
from chalicelib.store.models import BudgetPeriod, connection

GRANT_IDS_KEPT_SECONDS = 20 * 60     # longer than any retry of a move (a request's deadline)


def count() -> int:
    """Shards a team may use (RFT_BUDGET_SHARDS, default 16; 1 = the root only)."""
    return max(1, min(99, int(os.environ.get("RFT_BUDGET_SHARDS", "16"))))


def root_slices_max() -> int:
    """An instance carves its slices from a shard once it has seen this many slices open on the
    root (RFT_BUDGET_ROOT_SLICES, default 32): a team with few instances keeps one item."""
    return max(0, int(os.environ.get("RFT_BUDGET_ROOT_SLICES", "32")))


def pk(team_id: str, n: int) -> str:
    return f"{team_id}#b{n:02d}"


def grant_hold(n: int) -> str:
    return f"b{n:02d}"


def is_grant(hold_id: str) -> bool:
    return hold_id[:1] == "b"


def shard_of(hold_id: str) -> int:
    return int(hold_id[1:])


def setting_of(cfg) -> str:
    return f"{int(cfg.limit_micro)}:{float(cfg.updated_at or 0)!r}"


def ensure(team_id: str, period: str, n: int | None) -> None:
    """The root or shard item exists with its maps (a nested SET needs the map to exist)."""
    key = team_id if n is None else pk(team_id, n)
    extra = {} if n is None else {"granted": 0, "room": 0, "grants": {}}
    dynamo.put_once(BudgetPeriod(key, period, committed=0, spent=0, holds={}, alerted=[], **extra),
                    BudgetPeriod.period, "budget shard create")


def read(keys: list[str], period: str) -> dict[str, BudgetPeriod]:
    """Items by hash key, in one consistent BatchGetItem; a missing one is absent."""
    if not keys:
        return {}
    return dynamo.call(lambda: {i.team_id: i for i in BudgetPeriod.batch_get([(k, period) for k in keys],
                                                                              consistent_read=True)},
                       idempotent=True, what="budget shards read")


def granted_shards(root: BudgetPeriod) -> list[int]:
    return sorted(shard_of(h) for h in (root.holds.as_dict() if root.holds else {}) if is_grant(h))


def move(team_id: str, period: str, n: int, *, room: int = 0, spent: int = 0, limit: int | None = None,
         setting: str | None = None, close: int | None = None, stale: tuple[str, ...] = ()) -> bool:
    """One move between the root and shard n, in one transaction, applied at most once:
    `room` > 0 granted from the root (checked against `limit`), < 0 given back to it; `spent`
    moved from the shard to the root; `close` = the shard's whole grant, removed from the root
    (the shard has no slice). False when a condition is false (no room, moved meanwhile)."""
    gid = f"g{ids.now_ms():x}.{secrets.token_hex(4)}"
    b, grant_delta = grant_hold(n), room - spent
    shard, root = BudgetPeriod(pk(team_id, n), period), BudgetPeriod(team_id, period)
    s_actions = [BudgetPeriod.granted.add(grant_delta), BudgetPeriod.room.add(room),
                 BudgetPeriod.grants[gid].set(ids.now_ms()), *(BudgetPeriod.grants[g].remove() for g in stale)]
    s_cond = BudgetPeriod.grants[gid].does_not_exist()
    if setting is not None:
        s_actions.append(BudgetPeriod.setting.set(setting))
    if room < 0:
        s_cond &= BudgetPeriod.room >= -room
    if spent:
        s_actions += [BudgetPeriod.committed.add(-spent), BudgetPeriod.spent.add(-spent)]
        s_cond &= BudgetPeriod.spent >= spent
    if close is not None:       # exactly as read: no grant, no slice carved since
        s_cond &= (BudgetPeriod.granted == close) & (BudgetPeriod.room == -room)
    r_actions = [BudgetPeriod.committed.add(room)]
    if spent:
        r_actions.append(BudgetPeriod.spent.add(spent))
    if close is not None:
        r_actions.append(BudgetPeriod.holds[b].remove())
        r_cond = BudgetPeriod.holds[b] == close
    else:
        r_actions.append(BudgetPeriod.holds[b].set((BudgetPeriod.holds[b] | 0) + grant_delta))
        r_cond = (BudgetPeriod.committed.does_not_exist() | (BudgetPeriod.committed <= limit - room)) if room > 0 \
            else BudgetPeriod.holds[b].exists()

    def attempt():
        with TransactWrite(connection=connection()) as tx:
            tx.update(shard, actions=s_actions, condition=s_cond)
            tx.update(root, actions=r_actions, condition=r_cond)

    for first in (True, False):
        try:
            dynamo.call(attempt, idempotent=True, what="budget grant")
            return True
        except TransactWriteError as exc:
            if first and room > 0 and (dynamo.response_code(exc) == "ValidationException"
                                       or "ValidationError" in dynamo.reasons(exc)):
                # A shard (or root) never written this period: its maps do not exist yet.
                ensure(team_id, period, None)
                ensure(team_id, period, n)
                continue
            if not dynamo.is_condition(exc):
                raise
            break
    # An earlier attempt of this very move may have been applied (its answer lost): its id says.
    found = read([pk(team_id, n)], period).get(pk(team_id, n))
    return bool(found is not None and found.grants and gid in found.grants.as_dict())


def stale_grants(item: BudgetPeriod | None) -> tuple[str, ...]:
    """Grant ids old enough that no retry of their move can still come: pruned in the next move."""
    if item is None or not item.grants:
        return ()
    cutoff = ids.now_ms() - GRANT_IDS_KEPT_SECONDS * 1000
    return tuple(g for g, ms in item.grants.as_dict().items() if int(ms) < cutoff)[:20]


def grant(team_id: str, cfg, period: str, n: int, amount: int) -> int | None:
    """Shard n gets `amount` more room from the root, if the limit allows it (and its setting
    becomes the current one: the root's condition just checked everything granted against it).
    Returns the root's `committed` as read just before (for the instance's sizing), None if refused."""
    found = read([team_id, pk(team_id, n)], period)
    root = found.get(team_id)
    committed = int(root.committed or 0) if root is not None else 0
    if committed > int(cfg.limit_micro) - amount:
        return None                    # surely no room: no write (a refused write still costs the root a unit)
    if move(team_id, period, n, room=amount, limit=int(cfg.limit_micro), setting=setting_of(cfg),
            stale=stale_grants(found.get(pk(team_id, n)))):
        return committed
    return None


def reclaim(team_id: str, cfg, period: str) -> int:
    """Takes back into the root the free room every shard holds (a shard without room for a
    call while others have room: rebalanced, not refused). Returns how much came back."""
    root = read([team_id], period).get(team_id)
    if root is None:
        return 0
    back = 0
    for n in granted_shards(root):
        for _ in range(3):              # a slice carved meanwhile changes the room: read again
            item = read([pk(team_id, n)], period).get(pk(team_id, n))
            free = int(item.room or 0) if item is not None else 0
            if free <= 0:
                break
            # Its setting is left as it was: only a grant, which the root checks against the limit,
            # may mark a shard's room as checked under the current setting (room a slice taken under
            # an older one gives back later must not become usable unchecked).
            if move(team_id, period, n, room=-free, stale=stale_grants(item)):
                back += free
                break
    if back:
        logger.info("budget room reclaimed from shards", extra={"team_id": team_id, "micro": back})
    return back


def fold_idle(team_id: str, period: str) -> int:
    """Every shard with no slice open is folded into the root: its room given back, its spend
    moved, its grant removed (the reconciler: nothing is left held, the root shows the spend).
    Returns how many were folded."""
    root = read([team_id], period).get(team_id)
    if root is None:
        return 0
    folded = 0
    for n in granted_shards(root):
        item = read([pk(team_id, n)], period).get(pk(team_id, n))
        if item is None or (item.holds and item.holds.as_dict()):
            continue
        whole = int(item.granted or 0)
        if move(team_id, period, n, room=-int(item.room or 0), spent=int(item.spent or 0), close=whole,
                stale=stale_grants(item)):
            folded += 1
    return folded


def aggregate(team_id: str, period: str) -> BudgetPeriod:
    """The team's period as one item: the root, with each granted shard's spend added and its
    slices (and its free room, as `bNN`) in place of its grant. Reads are not one snapshot: a
    move between them may show a moment's difference; at rest it is exact."""
    root = read([team_id], period).get(team_id) or BudgetPeriod(team_id, period)
    holds = {k: int(v) for k, v in (root.holds.as_dict() if root.holds else {}).items() if not is_grant(k)}
    spent = int(root.spent or 0)
    ns = granted_shards(root)
    items = read([pk(team_id, n) for n in ns], period)
    for n in ns:
        item = items.get(pk(team_id, n))
        if item is None:
            continue
        spent += int(item.spent or 0)
        holds.update({k: int(v) for k, v in (item.holds.as_dict() if item.holds else {}).items()})
        if int(item.room or 0):
            holds[grant_hold(n)] = int(item.room)
    return BudgetPeriod(team_id, period, committed=int(root.committed or 0), spent=spent, holds=holds,
                        alerted=list(root.alerted or []))


def owners(team_id: str, period: str) -> list[tuple[str, BudgetPeriod]]:
    """(hash key, item) of the root and each granted shard: where slices may be open."""
    root = read([team_id], period).get(team_id)
    if root is None:
        return []
    ns = granted_shards(root)
    items = read([pk(team_id, n) for n in ns], period)
    return [(team_id, root), *((pk(team_id, n), items[pk(team_id, n)]) for n in ns if pk(team_id, n) in items)]


def pick(seed: int | None = None) -> int:
    """An instance's shard: spread at random, kept for its life."""
    return (seed if seed is not None else time.monotonic_ns() ^ secrets.randbits(32)) % count()
