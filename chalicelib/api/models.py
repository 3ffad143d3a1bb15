"""Models a team may call: base models, its tuned models, and aliases (OpenAI Model shape)."""
from __future__ import annotations

from chalice import Blueprint
from pydantic import Field

from chalicelib.api.http import Request, StrictModel, route
from chalicelib.errors import NotFound
from chalicelib.services import models, registry

bp = Blueprint(__name__)


class PointAlias(StrictModel):
    alias: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=300)


@route(bp, "/v1/models")
def list_models(req: Request):
    return {"object": "list", "data": models.list_for_team(req.team_id)}


@route(bp, "/v1/models/{model_id}")
def retrieve_model(req: Request, model_id: str):
    found = models.describe(req.team_id, model_id)
    if found is None:
        raise NotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return found


@route(bp, "/v1/models/aliases", ("POST",), body=PointAlias)
def point_alias(req: Request):
    return registry.point_alias(req.team_id, req.body.alias, req.body.model, changed_by=f"key:{req.principal.key_id}")


@route(bp, "/v1/models/aliases")
def list_aliases(req: Request):
    return {"object": "list", "data": registry.list_aliases(req.team_id)}


@route(bp, "/v1/models/aliases/{alias}/history")
def alias_history(req: Request, alias: str):
    return registry.alias_history(req.team_id, alias)
