"""What a `model` string is for a team (an alias, a tuned model or checkpoint, a priced base model) and
its price: the target every metered call is made for.

A key limited to some models (issue #29: `allowed`, the principal's `models`) is checked here, where
the model is resolved: any other model answers the 404 a model of another team answers, so a key
learns nothing of the team's other models.
"""
from __future__ import annotations

from dataclasses import dataclass

from chalicelib.domain import pricing, scopes
from chalicelib.errors import InvalidRequest, NotFound
from chalicelib.inference import registry
from chalicelib.spend import prices


@dataclass
class Target:
    requested: str
    upstream: str
    base_model: str
    alias: str | None


def base_models() -> set[str]:
    return set(pricing.repository_prices())


def _not_found(model: str, param: str) -> NotFound:
    return NotFound(f"The model '{model}' does not exist or you do not have access to it.", param=param,
                    code="model_not_found")


def resolve(team_id: str, model, param: str = "model", *, allowed=None) -> Target:
    """`allowed`: the models and aliases the caller's key may call (None: any)."""
    if not isinstance(model, str) or not model:
        raise InvalidRequest(f"{param} is required.", param=param)
    if len(model) > 256:
        raise InvalidRequest(f"{param} is longer than 256 characters.", param=param)
    if model in base_models():
        target = Target(model, model, model, None)
    else:
        found = registry.resolve_cached(team_id, model)
        if found is None:
            raise _not_found(model, param)
        target = Target(model, found["model"], found["base_model"], found.get("alias"))
    if not scopes.model_allowed(allowed, model, alias=target.alias, upstream=target.upstream):
        raise _not_found(model, param)
    return target


def priced(team_id: str, model, param: str = "model", *, allowed=None) -> tuple[Target, pricing.Price]:
    target = resolve(team_id, model, param, allowed=allowed)
    price = prices.price(target.upstream, target.base_model)
    if price is None:
        raise InvalidRequest(f"Model '{target.requested}' has no price, so calls to it cannot be metered; an "
                             "admin can set one with PUT /v1/admin/prices/{model}.", param=param,
                             code="model_not_priced")
    return target, price
