"""Team budgets: money is set aside before any upstream call and settled at the actual cost.

Every team has one item per period holding `committed` (spent + everything set aside), `spent`
and what is set aside, as a map {id: micro}: training jobs' holds and instances' slices
(spend/slices.py: a warm instance takes a slice in one write and admits calls against it in
memory). Every write on this team-wide item is a single UpdateItem, never a transaction, which
DynamoDB would cancel under concurrency:

- take: `SET holds.<id> = m, ADD committed m` if `committed <= limit - m` and the id is new, so
  what is set aside can never pass the limit, and a repeat is a no-op. A slice's renewal gives
  the old slice back in the same write (`release`).
- settle: `REMOVE holds.<id>, ADD committed (actual - m), spent actual` if the id exists.
  Repeating it is a no-op, so settlements are retried, never skipped.

Ids carry their kind and creation time, so the reconciler knows when the calls admitted against
one have surely ended (`closable_at`) and settles what was never given back from the ledger
(spend/metering.py); a job's hold is the job's to settle, unless no job was recorded with it.
Threshold crossings are announced once per threshold per period (a deterministic outbox id).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from pynamodb.exceptions import DoesNotExist, PutError, UpdateError

from chalicelib import outbox
from chalicelib.cache import TTLCache
from chalicelib.domain import budget as rules
from chalicelib.domain import ids, numbers, pricing
from chalicelib.errors import InvalidRequest, RateLimited
from chalicelib.log import logger
from chalicelib.platform import audit
from chalicelib.spend import shards
from chalicelib.store import dynamo
from chalicelib.store.models import Budget, BudgetPeriod

_config = TTLCache(30)   # a changed budget is honoured within 30 s on other instances
HOLD_TTL_SECONDS = 20 * 60   # a job's hold (and a per-call hold of an older version): longer than any call
SLICE_WINDOW_SECONDS = 60    # a slice admits calls for this long after it is taken
CALL_SECONDS = {"s": 30, "u": 900}   # the longest call a short (s) or long (u) slice admits
CLOSE_MARGIN_SECONDS = 60    # for the ledger write after the answer (with its retries) and clock skew


class OverBudget(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"
    should_retry = False


@dataclass
class Reservation:
    team_id: str
    period: str
    micro: int                # 0 when the team has no budget
    hold_id: str | None = None
    committed_after: int = 0
    limit_micro: int | None = None
    spent_after: int = 0
    pk: str | None = None     # the item it is held on: the team's root, or a shard (spend/shards.py)
    room_after: int = 0       # on a shard: the shard's free room after the take
    holds_after: int = 0      # holds open on its item after the take


# ---- hold ids ------------------------------------------------------------------------------------

def call_hold_id(created_ms: int) -> str:
    """`c<created ms, hex>.<random>`: one call's own hold (short: it is stored in the hot item)."""
    return f"c{created_ms:x}.{secrets.token_hex(4)}"


def slice_id(kind: str, created_ms: int) -> str:
    """`s...` admits calls of at most 30 s, `u...` of at most 15 minutes (streams)."""
    return f"{kind}{created_ms:x}.{secrets.token_hex(4)}"


def job_hold_id(job_id: str, created_ms: int) -> str:
    """`j<created ms, hex>.<job id>`: a concurrent replay of one create holds under its own id
    (and gives it back when it loses the race); the reconciler can tell an orphan from its job."""
    return f"j{created_ms:x}.{job_id}"


def hold_job_id(hold_id: str) -> str | None:
    return hold_id.split(".", 1)[1] if hold_id.startswith("j") and "." in hold_id else None


def is_slice(hold_id: str) -> bool:
    return hold_id[:1] in CALL_SECONDS


def hold_created_ms(hold_id: str) -> int | None:
    if hold_id[:1] not in ("c", "j", *CALL_SECONDS):
        return None
    try:
        return int(hold_id[1:].split(".", 1)[0], 16)
    except ValueError:
        return None


def closable_at(hold_id: str) -> float | None:
    """When every call admitted against this id has surely ended and written its ledger entry
    (unix seconds): a slice admits for SLICE_WINDOW_SECONDS calls of at most its kind's length."""
    created = hold_created_ms(hold_id)
    if created is None:
        return None
    if is_slice(hold_id):
        return created / 1000 + SLICE_WINDOW_SECONDS + CALL_SECONDS[hold_id[0]] + CLOSE_MARGIN_SECONDS
    return created / 1000 + HOLD_TTL_SECONDS


def hold_expired(hold_id: str, now_s: float) -> bool:
    at = closable_at(hold_id)
    return at is not None and at < now_s


# ---- owners: a team, or one key's own budget inside it -------------------------------------------

def key_owner(team_id: str, key_id: str) -> str:
    """A key's own budget is kept as a budget owner of its own (its config, period items and
    slices keyed by this id), so admission against it is the same mechanism as the team's."""
    return f"{team_id}/key/{key_id}"


def owner_key(owner: str) -> tuple[str, str] | None:
    """(team id, key id) of a key's budget owner id; None for a team."""
    team_id, sep, key_id = owner.partition("/key/")
    return (team_id, key_id) if sep else None


# ---- config and view -----------------------------------------------------------------------------

def config(team_id: str) -> Budget | None:
    return _config.get(team_id, lambda: dynamo.get_or_none(Budget, team_id, what="budget config read"))


def period_item(team_id: str, period: str) -> BudgetPeriod:
    """The team's period as one item, its shards included (shards.aggregate)."""
    return shards.aggregate(team_id, period)


def raw_item(key: str, period: str) -> BudgetPeriod:
    """One item as stored: the root (key = team id) or a shard."""
    try:
        return dynamo.call(lambda: BudgetPeriod.get(key, period, consistent_read=True),
                           idempotent=True, what="budget read")
    except DoesNotExist:
        return BudgetPeriod(key, period)


def free_room(cfg: Budget, item: BudgetPeriod) -> int:
    """What the budget could still set aside: its unallocated room plus the shards' free room."""
    return cfg.limit_micro - int(item.committed or 0) + sum(v for k, v in open_holds(item).items()
                                                            if shards.is_grant(k))


def open_holds(item: BudgetPeriod) -> dict[str, int]:
    return {k: int(v) for k, v in (item.holds.as_dict() if item.holds else {}).items()}


def view(team_id: str) -> dict:
    cfg = config(team_id)
    period = rules.period_of(ids.now())
    item = period_item(team_id, period)
    holds = open_holds(item)
    shard_room = sum(v for k, v in holds.items() if shards.is_grant(k))     # free room on shards: not reserved
    keyed = owner_key(team_id)
    out = {"object": "budget", "team_id": keyed[0] if keyed else team_id, "period": "monthly",
           "current_period": period,
           "resets_at": rules.resets_at(period), "spent_usd": pricing.usd(item.spent or 0),
           "reserved_usd": pricing.usd((item.committed or 0) - (item.spent or 0) - shard_room),
           "open_holds": len([k for k in holds if not shards.is_grant(k)]),
           "limit_usd": None, "remaining_usd": None, "alert_thresholds": [], "alerted": list(item.alerted or [])}
    if cfg:
        out.update({"limit_usd": pricing.usd(cfg.limit_micro), "alert_thresholds": list(cfg.thresholds),
                    "remaining_usd": pricing.usd(max(0, free_room(cfg, item)))})
    if keyed:
        out["key_id"] = keyed[1]
    return out


def set_budget(team_id: str, body: dict, key_id: str | None = None) -> dict:
    """The team's budget, or (`key_id`) that key's own monthly budget inside the team's. A key's
    budget has no alert thresholds (the team's alerts cover the team's spend)."""
    owner = key_owner(team_id, key_id) if key_id else team_id
    if key_id and body.get("alert_thresholds"):
        raise InvalidRequest("alert_thresholds are set on the team's budget, not on a key's.",
                             param="alert_thresholds")
    if body.get("period", "monthly") != "monthly":
        raise InvalidRequest("period must be 'monthly' (calendar month, UTC).", param="period")
    try:
        limit = rules.to_micro(body.get("limit_usd"), rules.MAX_BUDGET_MICRO)
    except ValueError as exc:
        raise InvalidRequest(f"limit_usd: {exc}.", param="limit_usd") from None
    thresholds = body.get("alert_thresholds", [] if key_id else [0.5, 0.8, 1.0])
    if not isinstance(thresholds, list) or len(thresholds) > 10 or any(
            numbers.finite(t) is None or not 0 < t <= 1 for t in thresholds):     # 5e-324: not storable
        raise InvalidRequest("alert_thresholds must be up to 10 fractions in (0, 1].", param="alert_thresholds")
    before = dynamo.get_or_none(Budget, owner, what="budget config read")
    item = Budget(owner, limit_micro=limit, period="monthly", thresholds=sorted(set(float(t) for t in thresholds)),
                  updated_at=ids.now())
    audit.save(item, action="budget.set", target=f"key:{key_id}" if key_id else f"team:{team_id}",
               team_id=team_id, fields=("limit_micro", "period", "thresholds"), before_item=before,
               what="budget change")                                                   # one transaction
    _config.invalidate(owner)
    return view(owner)


# ---- reserve and settle --------------------------------------------------------------------------

def over_budget(micro: int, cfg: Budget, period: str) -> OverBudget:
    keyed = owner_key(cfg.team_id)
    whose = f"API key {keyed[1]}'s own" if keyed else "team's"
    return OverBudget(f"This request could cost up to ${pricing.usd(micro)}, more than what is left of the "
                      f"{whose} ${pricing.usd(cfg.limit_micro)} monthly budget (resets at "
                      f"{rules.resets_at(period)}). Lower max_tokens or ask an admin to raise the budget.")


def _ensure_period(team_id: str, period: str) -> None:
    """Creates the period item with an empty holds map (a nested SET needs the map to exist)."""
    dynamo.put_once(BudgetPeriod(team_id, period, committed=0, spent=0, holds={}, alerted=[]), BudgetPeriod.period,
                    "budget period create")


def _missing_map(exc: UpdateError) -> bool:
    return dynamo.response_code(exc) == "ValidationException" and "document path" in str(exc.cause).lower()


def reserve(team_id: str, micro: int, hold_id: str | None = None) -> Reservation:
    """Holds `micro` against the team's budget, or raises 429 insufficient_quota (only when the
    budget really has no room) or 503 (DynamoDB busy). No budget: a no-op. Idempotent per hold id."""
    cfg = config(team_id)
    period = rules.period_of(ids.now())
    if cfg is None:
        return Reservation(team_id, period, 0)
    if micro > cfg.limit_micro:
        raise over_budget(micro, cfg, period)
    res = take(team_id, cfg, period, hold_id or call_hold_id(int(ids.now_ms())), micro)
    if res is None:
        raise over_budget(micro, cfg, period)
    return res


class Released(Exception):
    """The slice a renewal was to give back is gone (the reconciler closed it from the ledger)."""


def take(team_id: str, cfg: Budget, period: str, hold_id: str, micro: int,
         release: tuple[str, int, int] | None = None, pk: str | None = None) -> Reservation | None:
    """Sets `micro` aside under `hold_id` in one conditional write; None when the budget has no
    room for it. `release` = (id, micro, used): a slice given back in the same write, its `used`
    moved to spent. Retried only when DynamoDB surely did not apply it (throttle, conflict); after
    an unknown outcome (timeout, 5xx) the read tells. Raises StoreBusy (503) when DynamoDB stays
    busy, Released when `release` names a slice no longer there.
    `pk`: a shard's key (spend/shards.py): carved from the shard's room, under the current setting."""
    key = pk or team_id
    on_shard = key != team_id
    item = BudgetPeriod(key, period)
    delta = micro - (release[1] - release[2]) if release else micro
    actions = [BudgetPeriod.holds[hold_id].set(micro), BudgetPeriod.committed.add(delta)]
    if on_shard:
        actions.append(BudgetPeriod.room.add(-delta))
        room = (BudgetPeriod.room >= delta) & (BudgetPeriod.setting == shards.setting_of(cfg))
    else:
        room = BudgetPeriod.committed <= cfg.limit_micro - delta
    condition = BudgetPeriod.holds[hold_id].does_not_exist()
    if release:
        old = release[0]
        actions += [BudgetPeriod.holds[old].remove(), BudgetPeriod.spent.add(release[2])]
        condition &= BudgetPeriod.holds[old].exists() & room
    elif on_shard:
        condition &= room
    else:
        condition &= BudgetPeriod.committed.does_not_exist() | room

    def attempt():
        item.update(actions=actions, condition=condition)

    for _ in range(2):
        try:
            dynamo.call(attempt, idempotent=False, what="budget reservation")
            res = Reservation(team_id, period, micro, hold_id, int(item.committed), cfg.limit_micro,
                              int(item.spent or 0), pk=key, room_after=int(item.room or 0),
                              holds_after=len(item.holds.as_dict()) if item.holds else 0)
            if release and not on_shard:
                announce_thresholds(res, int(item.spent or 0), list(item.alerted or []))
            elif release:
                _announce_team(res)
            return res
        except UpdateError as exc:
            if _missing_map(exc) and not release and not on_shard:
                _ensure_period(team_id, period)
                continue
            if _missing_map(exc) or (on_shard and dynamo.response_code(exc) == "ValidationException"):
                return None           # a shard never granted anything: no room on it
            if not dynamo.is_condition(exc):
                raise
            current = raw_item(key, period)
            holds = open_holds(current)
            if hold_id in holds:      # an earlier attempt was applied after all
                return Reservation(team_id, period, micro, hold_id, int(current.committed or 0), cfg.limit_micro,
                                   pk=key, room_after=int(current.room or 0))
            if release and release[0] not in holds:
                raise Released(release[0]) from None
            return None
    raise dynamo.busy_error("budget reservation")


def settle(res: Reservation, actual_micro: int) -> bool:
    """Moves a hold to spend at `actual_micro` (0 releases it). True if this call settled it,
    False if it was settled already. Raises StoreBusy (503) when DynamoDB stays busy."""
    if not res.hold_id:
        return False
    on_shard = bool(res.pk) and res.pk != res.team_id
    item = BudgetPeriod(res.pk or res.team_id, res.period)
    actions = [BudgetPeriod.holds[res.hold_id].remove(), BudgetPeriod.committed.add(actual_micro - res.micro),
               BudgetPeriod.spent.add(actual_micro)]
    if on_shard:
        actions.append(BudgetPeriod.room.add(res.micro - actual_micro))   # what it did not use: the shard's again
    try:
        dynamo.call(lambda: item.update(actions=actions, condition=BudgetPeriod.holds[res.hold_id].exists()),
                    idempotent=True, what="budget settlement")
    except UpdateError as exc:
        if dynamo.is_condition(exc) or _missing_map(exc):
            # Settled already -- perhaps by this call's own first attempt whose answer was lost:
            # make sure its threshold crossings were announced all the same.
            _announce_team(res)
            return False
        raise
    res.committed_after = int(item.committed or 0)
    if on_shard:
        _announce_team(res)
    else:
        announce_thresholds(res, int(item.spent or 0), list(item.alerted or []))
    return True


def _announce_team(res: Reservation) -> None:
    """Thresholds the team's whole spend (root and shards) has reached."""
    cfg = config(res.team_id)
    if cfg is None or not cfg.thresholds:
        return
    current = period_item(res.team_id, res.period)
    announce_thresholds(Reservation(res.team_id, res.period, 0), int(current.spent or 0), list(current.alerted or []))


def announce_thresholds(res: Reservation, spent: int, alerted: list) -> None:
    """Every threshold that `spent` has reached and that is not yet marked announced, once per
    period: the outbox event's id is derived from (team, period, threshold) and written only if
    absent, so racing or repeated calls announce it once, with no transaction on the budget item."""
    cfg = config(res.team_id)
    if cfg is None or not cfg.thresholds:
        return
    for t in rules.crossed(cfg.thresholds, cfg.limit_micro, -1, spent, alerted):
        event = outbox.stage("rft-hub.budget.threshold_crossed", res.team_id, threshold=t, period=res.period,
                             limit_usd=pricing.usd(cfg.limit_micro), spent_usd=pricing.usd(spent),
                             resets_at=rules.resets_at(res.period),
                             event_id=ids.stable_id("evt", "budget", res.team_id, res.period, str(t)))
        try:
            dynamo.call(lambda event=event: event.save(condition=type(event).event_id.does_not_exist()),
                        idempotent=True, what="threshold event")
            fresh = True
        except PutError as exc:
            if not dynamo.is_condition(exc):
                raise
            fresh = False   # announced already (by a racing call, or by one that died before marking it)
        try:
            BudgetPeriod(res.team_id, res.period).update(
                actions=[BudgetPeriod.alerted.set((BudgetPeriod.alerted | []).append([t]))],
                condition=BudgetPeriod.alerted.does_not_exist() | ~BudgetPeriod.alerted.contains(t))
        except UpdateError:
            pass   # marked already; `alerted` only saves later calls this check
        if fresh:
            logger.info("budget threshold crossed", extra={"team_id": res.team_id, "threshold": t})
            outbox.publish([event])
