"""Team budgets: reserve the worst case before any upstream call, settle to the actual cost.

Every team has a period item holding `committed` (spent + open reservations) and `spent`.
A reservation is one conditional ADD (`committed <= limit - amount`), so 50 concurrent calls
against a budget that covers 10 admit at most 10; settling moves the reservation to the
actual cost. Threshold crossings are announced once per threshold per period.
"""
from __future__ import annotations

from dataclasses import dataclass

from pynamodb.exceptions import DoesNotExist, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import budget as rules
from chalicelib.domain import ids, pricing
from chalicelib.errors import InvalidRequest, RateLimited
from chalicelib.log import logger
from chalicelib.services import outbox
from chalicelib.services.cache import TTLCache
from chalicelib.store.models import Budget, BudgetPeriod, connection

_config = TTLCache(30)   # a changed budget is honoured within 30 s on other instances


class OverBudget(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


@dataclass
class Reservation:
    team_id: str
    period: str
    micro: int                # 0 when the team has no budget
    committed_after: int = 0
    limit_micro: int | None = None


def config(team_id: str) -> Budget | None:
    def load():
        try:
            return Budget.get(team_id)
        except DoesNotExist:
            return None
    return _config.get(team_id, load)


def _period_item(team_id: str, period: str) -> BudgetPeriod:
    try:
        return BudgetPeriod.get(team_id, period, consistent_read=True)
    except DoesNotExist:
        return BudgetPeriod(team_id, period)


def view(team_id: str) -> dict:
    cfg = config(team_id)
    period = rules.period_of(ids.now())
    item = _period_item(team_id, period)
    out = {"object": "budget", "team_id": team_id, "period": "monthly", "current_period": period,
           "resets_at": rules.resets_at(period), "spent_usd": pricing.usd(item.spent or 0),
           "reserved_usd": pricing.usd((item.committed or 0) - (item.spent or 0)),
           "limit_usd": None, "remaining_usd": None, "alert_thresholds": [], "alerted": list(item.alerted or [])}
    if cfg:
        out.update({"limit_usd": pricing.usd(cfg.limit_micro), "alert_thresholds": list(cfg.thresholds),
                    "remaining_usd": pricing.usd(max(0, cfg.limit_micro - (item.committed or 0)))})
    return out


def set_budget(team_id: str, body: dict) -> dict:
    if body.get("period", "monthly") != "monthly":
        raise InvalidRequest("period must be 'monthly' (calendar month, UTC).", param="period")
    try:
        limit = rules.to_micro(body.get("limit_usd"))
    except ValueError as exc:
        raise InvalidRequest(f"limit_usd: {exc}.", param="limit_usd") from None
    thresholds = body.get("alert_thresholds", [0.5, 0.8, 1.0])
    if not isinstance(thresholds, list) or len(thresholds) > 10 or any(
            isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1 for t in thresholds):
        raise InvalidRequest("alert_thresholds must be up to 10 fractions in (0, 1].", param="alert_thresholds")
    Budget(team_id, limit_micro=limit, period="monthly", thresholds=sorted(set(float(t) for t in thresholds)),
           updated_at=ids.now()).save()
    _config.invalidate(team_id)
    return view(team_id)


def reserve(team_id: str, micro: int) -> Reservation:
    """Holds `micro` against the team's budget, or raises 429 insufficient_quota. No budget: no-op."""
    cfg = config(team_id)
    period = rules.period_of(ids.now())
    if cfg is None:
        return Reservation(team_id, period, 0)
    ceiling = cfg.limit_micro - micro
    item = BudgetPeriod(team_id, period)
    try:
        if ceiling < 0:
            raise UpdateError("over")
        item.update(actions=[BudgetPeriod.committed.add(micro)],
                    condition=BudgetPeriod.committed.does_not_exist() | (BudgetPeriod.committed <= ceiling))
    except UpdateError:
        raise OverBudget(f"This request could cost up to ${pricing.usd(micro)}, more than what is left of the "
                         f"team's ${pricing.usd(cfg.limit_micro)} monthly budget (resets at "
                         f"{rules.resets_at(period)}). Lower max_tokens or ask an admin to raise the budget.") \
            from None
    return Reservation(team_id, period, micro, int(item.committed), cfg.limit_micro)


def settle_in(tx: TransactWrite, res: Reservation, actual_micro: int) -> None:
    """Adds the settlement of `res` at `actual_micro` to a transaction (always records spend)."""
    tx.update(BudgetPeriod(res.team_id, res.period),
              actions=[BudgetPeriod.committed.add(actual_micro - res.micro), BudgetPeriod.spent.add(actual_micro)])


def settle(res: Reservation, actual_micro: int) -> None:
    with TransactWrite(connection=connection()) as tx:
        settle_in(tx, res, actual_micro)
    announce_thresholds(res, actual_micro)


def announce_thresholds(res: Reservation, actual_micro: int) -> None:
    """Cheap check first (from the reservation's view of the counter); reads only near a threshold."""
    cfg = config(res.team_id)
    if cfg is None or not cfg.thresholds:
        return
    estimate_after = res.committed_after - res.micro + actual_micro
    if not rules.crossed(cfg.thresholds, cfg.limit_micro, estimate_after - actual_micro - 1, estimate_after, []):
        return
    item = _period_item(res.team_id, res.period)
    for t in rules.crossed(cfg.thresholds, cfg.limit_micro, -1, item.spent or 0, list(item.alerted or [])):
        event = outbox.stage("rft-hub.budget.threshold_crossed", res.team_id, threshold=t, period=res.period,
                             limit_usd=pricing.usd(cfg.limit_micro), spent_usd=pricing.usd(item.spent or 0),
                             resets_at=rules.resets_at(res.period))
        try:
            with TransactWrite(connection=connection()) as tx:
                tx.update(BudgetPeriod(res.team_id, res.period),
                          actions=[BudgetPeriod.alerted.set((BudgetPeriod.alerted | []).append([t]))],
                          condition=BudgetPeriod.alerted.does_not_exist() | ~BudgetPeriod.alerted.contains(t))
                tx.save(event)
        except TransactWriteError:
            continue   # another call announced it
        logger.info("budget threshold crossed", extra={"team_id": res.team_id, "threshold": t})
        outbox.publish([event])
