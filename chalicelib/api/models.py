"""Models a team may call: base models, its tuned models, and aliases (OpenAI Model shape)."""
from __future__ import annotations

from typing import Any

from chalice import Blueprint
from pydantic import Field

from chalicelib.api.bodies import StrictModel
from chalicelib.api.http import Request, route
from chalicelib.errors import InvalidRequest, NotFound
from chalicelib.evaluation import promotion
from chalicelib.inference import models, registry

bp = Blueprint(__name__)


class PointAlias(StrictModel):
    alias: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=300)
    # Promotion gate (issue #17): {"eval_id", "criteria": {<criterion>: <min score>}, "no_worse_than_current"};
    # null removes it. Changing or removing an existing gate, and `override_reason`, are the admin's.
    gate: dict[str, Any] | None = None
    override_reason: str | None = Field(default=None, min_length=1, max_length=1000)
    team_id: str | None = Field(default=None, min_length=1, max_length=256)   # with the admin key: whose alias


@route(bp, "/v1/models")
def list_models(req: Request):
    return {"object": "list", "data": models.list_for_team(req.team_id, req.principal.models)}


@route(bp, "/v1/models/{model_id}")
def retrieve_model(req: Request, model_id: str):
    found = models.describe(req.team_id, model_id, req.principal.models)
    if found is None:
        raise NotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return found


@route(bp, "/v1/models/{model_id}", ("DELETE",))
def delete_model(req: Request, model_id: str):
    """Retires a tuned model (OpenAI's `client.models.delete`); refused while an alias points at it."""
    return registry.retire(req.team_id, model_id)


@route(bp, "/v1/models/aliases", ("POST",), body=PointAlias, auth="any")
def point_alias(req: Request):
    """Point an alias at a model (gated aliases need a passing eval run, or the admin's override)."""
    body, principal = req.body, req.principal
    if principal.is_admin:
        if not body.team_id:
            raise InvalidRequest("With the admin key, 'team_id' names the team whose alias this is.", param="team_id")
        team_id, changed_by = body.team_id, "admin"
    else:
        if body.team_id is not None and body.team_id != principal.team_id:
            raise InvalidRequest("'team_id' is only for the admin key; a team key moves its own team's aliases.",
                                 param="team_id")
        team_id, changed_by = principal.team_id, f"key:{principal.key_id}"
    gate = body.gate if "gate" in body.model_fields_set else promotion.KEEP_GATE
    return promotion.point_alias(team_id, body.alias, body.model, changed_by=changed_by, gate=gate,
                                override_reason=body.override_reason, admin=principal.is_admin)


@route(bp, "/v1/models/aliases")
def list_aliases(req: Request):
    return {"object": "list", "data": registry.list_aliases(req.team_id)}


@route(bp, "/v1/models/aliases/{alias}/history")
def alias_history(req: Request, alias: str):
    return promotion.alias_history(req.team_id, alias)
