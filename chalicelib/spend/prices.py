"""Effective prices: admin override, else the repository table; a tuned model inherits its
base model's price unless it has its own override. Cached per warm container (60 s)."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation

from pynamodb.exceptions import DoesNotExist

from chalicelib.cache import TTLCache
from chalicelib.domain import ids, pricing
from chalicelib.domain.budget import MAX_PRICE_PER_1M
from chalicelib.errors import InvalidRequest, NotFound
from chalicelib.platform import audit
from chalicelib.store import dynamo
from chalicelib.store.models import PriceOverride

_cache = TTLCache(60)


def _override(model: str) -> pricing.Price | None:
    try:
        o = PriceOverride.get(model)
    except DoesNotExist:
        return None
    return pricing.Price(model, Decimal(o.input), Decimal(o.output), Decimal(o.cached_input),
                         o.note or "admin override", str(o.updated_at), False)


def _load(model: str) -> pricing.Price | None:
    return _override(model) or pricing.price_for(model)


def price(model: str, base_model: str | None = None) -> pricing.Price | None:
    """The price for calling `model` (a tuned model passes its base model)."""
    own = _cache.get(model, lambda: dynamo.call(lambda: _load(model), idempotent=True, what="price read"))
    if own is not None or not base_model or base_model == model:
        return own
    return _cache.get(base_model, lambda: dynamo.call(lambda: _load(base_model), idempotent=True,
                                                      what="price read"))


_AUDITED = ("input", "output", "cached_input", "note")


def set_override(model: str, body: dict) -> dict:
    values = {}
    for field in ("input", "output", "cached_input"):
        raw = body.get(f"{field}_usd_per_1m", body.get(field))
        if raw is None and field == "cached_input":
            raw = values["input"]
        param = f"{field}_usd_per_1m"
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float, Decimal)) or len(str(raw)) > 24:
            raise InvalidRequest(f"'{param}' must be a decimal amount such as \"0.15\".", param=param)
        try:
            value = Decimal(str(raw))
        except (InvalidOperation, ValueError):
            raise InvalidRequest(f"'{param}' must be a decimal amount.", param=param) from None
        if not value.is_finite() or value < 0 or value > MAX_PRICE_PER_1M:
            raise InvalidRequest(f"'{param}' must be between 0 and {MAX_PRICE_PER_1M} USD per 1M tokens.",
                                 param=param)
        if value.as_tuple().exponent < -9:
            raise InvalidRequest(f"'{param}' has more than 9 decimal places.", param=param)
        values[field] = value
    before = dynamo.get_or_none(PriceOverride, model, what="price read")
    item = PriceOverride(model, input=str(values["input"]), output=str(values["output"]),
                         cached_input=str(values["cached_input"]), updated_at=ids.now(),
                         note=str(body.get("note") or "admin override")[:200])
    audit.save(item, action="price.set", target=f"price:{model}", team_id=None, fields=_AUDITED,
               before_item=before, what="price change")
    _cache.invalidate(model)
    return _load(model).view()


def delete_override(model: str) -> dict:
    """Back to the repository's price (or to no price: calls to the model are then refused)."""
    item = dynamo.get_or_none(PriceOverride, model, what="price read")
    if item is None:
        raise NotFound(f"No price override for '{model}'.", param="model")
    audit.delete(item, action="price.deleted", target=f"price:{model}", team_id=None, fields=_AUDITED,
                 what="price change")
    _cache.invalidate(model)
    current = _load(model)
    return current.view() if current else {"model": model, "priced": False}


def list_prices() -> list[dict]:
    models = set(pricing.repository_prices()) | {o.model for o in PriceOverride.scan()}
    return [_load(m).view() for m in sorted(models)]
