"""What a team can call: base models (priced ones only), its tuned models and aliases."""
from __future__ import annotations

from chalicelib.domain import pricing, scopes
from chalicelib.inference import registry


def base_models() -> list[dict]:
    return [{"id": m, "object": "model", "created": 0, "owned_by": "amazon-bedrock", "rft_kind": "base",
             "rft_price": p.view()} for m, p in sorted(pricing.repository_prices().items())]


def _visible(m: dict, allowed) -> bool:
    """A key limited to some models sees only those (others are as absent as another team's)."""
    alias = m["id"] if m.get("rft_kind") == "alias" else None
    return scopes.model_allowed(allowed, m["id"], alias=alias, upstream=m.get("rft_target"))


def list_for_team(team_id: str, allowed=None) -> list[dict]:
    found = base_models() + registry.list_tuned(team_id) + registry.list_aliases(team_id)
    return [m for m in found if _visible(m, allowed)]


def describe(team_id: str, model_id: str, allowed=None) -> dict | None:
    found = next((m for m in base_models() if m["id"] == model_id), None) or registry.describe(team_id, model_id)
    return found if found is not None and _visible(found, allowed) else None
