"""What a team can call: base models (priced ones only), its tuned models and aliases."""
from __future__ import annotations

from chalicelib.domain import pricing
from chalicelib.inference import registry


def base_models() -> list[dict]:
    return [{"id": m, "object": "model", "created": 0, "owned_by": "amazon-bedrock", "rft_kind": "base",
             "rft_price": p.view()} for m, p in sorted(pricing.repository_prices().items())]


def list_for_team(team_id: str) -> list[dict]:
    return base_models() + registry.list_tuned(team_id) + registry.list_aliases(team_id)


def describe(team_id: str, model_id: str) -> dict | None:
    for m in base_models():
        if m["id"] == model_id:
            return m
    return registry.describe(team_id, model_id)
