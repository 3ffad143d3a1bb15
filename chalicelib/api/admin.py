"""Admin API: teams, their keys and their Lambda graders (authenticated with the admin key), and
the audit log (the admin's, or a team key's own team's)."""
from __future__ import annotations

from typing import Literal

from chalice import Blueprint
from pydantic import Field, field_validator

from chalicelib.api.bodies import StrictModel
from chalicelib.api.http import Request, query_int, route
from chalicelib.domain import ids, scopes
from chalicelib.errors import InvalidRequest, NotFound
from chalicelib.evaluation import promotion
from chalicelib.grading import lambda_graders
from chalicelib.inference import guardrails
from chalicelib.platform import audit, teams
from chalicelib.spend import budgets

bp = Blueprint(__name__)


class CreateTeam(StrictModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$")


class RegisterLambdaGrader(StrictModel):
    function_arn: str = Field(min_length=1, max_length=512)


class ReleaseModel(StrictModel):
    model: str = Field(min_length=1, max_length=512)
    reason: str = Field(min_length=1, max_length=1000)


@route(bp, "/v1/admin/teams", ("POST",), auth="admin", body=CreateTeam)
def create_team(req: Request):
    return 201, teams.create_team(req.body.name)


@route(bp, "/v1/admin/teams", auth="admin")
def list_teams(req: Request):
    return {"object": "list", "data": teams.list_teams()}


@route(bp, "/v1/admin/teams/{team_id}", auth="admin")
def get_team(req: Request, team_id: str):
    return teams.team_view(teams.get_team(team_id))


MAX_UNIX = 10 ** 11    # year 5138: past any expiry an admin means, within what DynamoDB and JSON hold exactly


class IssueKey(StrictModel):
    """A scoped key (docs/controls.md). Every field optional: an empty body is a full key for any model."""
    name: str | None = Field(default=None, min_length=1, max_length=100)
    owner: str | None = Field(default=None, min_length=1, max_length=200)
    role: Literal["full", "inference", "read"] = "full"
    models: list[str] | None = None
    expires_at: int | None = Field(default=None, ge=1, le=MAX_UNIX)

    @field_validator("models")
    @classmethod
    def _models(cls, value):
        return list(scopes.check_models(value)) if value is not None else None


class RotateKey(StrictModel):
    # When the old key stops working (unix s); default: in 24 hours. Now: at once.
    old_key_expires_at: int | None = Field(default=None, ge=0, le=MAX_UNIX)
    old_key_expires_in: int | None = Field(default=None, ge=0, le=90 * 86400)


@route(bp, "/v1/admin/teams/{team_id}/keys", ("POST",), auth="admin", body=IssueKey, body_optional=True)
def issue_key(req: Request, team_id: str):
    """Issue a key: optional name, owner, role (full | inference | read), models and expires_at."""
    spec = req.body
    return 201, teams.issue_key(team_id, teams.KeySpec(
        name=spec.name, owner=spec.owner, role=spec.role, expires_at=spec.expires_at,
        models=tuple(spec.models) if spec.models is not None else None))


@route(bp, "/v1/admin/keys/{key_id}/rotate", ("POST",), auth="admin", body=RotateKey, body_optional=True)
def rotate_key(req: Request, key_id: str):
    """Issue a key in this one's place; the old one works until old_key_expires_at (or _in seconds)."""
    spec = req.body
    if spec.old_key_expires_at is not None and spec.old_key_expires_in is not None:
        raise InvalidRequest("Give old_key_expires_at or old_key_expires_in, not both.", param="old_key_expires_at")
    now = ids.now()
    until = spec.old_key_expires_at if spec.old_key_expires_at is not None else \
        now + (spec.old_key_expires_in if spec.old_key_expires_in is not None else 86400)
    return 201, teams.rotate_key(key_id, until)


@route(bp, "/v1/admin/teams/{team_id}/keys", auth="admin")
def list_keys(req: Request, team_id: str):
    return {"object": "list", "data": teams.list_keys(team_id)}


@route(bp, "/v1/admin/teams/{team_id}/keys/{key_id}/budget", ("PUT",), auth="admin", json_body=True)
def set_key_budget(req: Request, team_id: str, key_id: str):
    """The key's own monthly budget inside the team's ({"limit_usd": "..."}); audited as budget.set."""
    _team_key(team_id, key_id)
    return budgets.set_budget(team_id, req.body, key_id=key_id)


@route(bp, "/v1/admin/teams/{team_id}/keys/{key_id}/budget", auth="admin")
def get_key_budget(req: Request, team_id: str, key_id: str):
    _team_key(team_id, key_id)
    return budgets.view(budgets.key_owner(team_id, key_id))


def _team_key(team_id: str, key_id: str) -> None:
    """404 unless the team exists and the key is one of its own (another team's is not found)."""
    teams.get_team(team_id)
    if teams.get_key(key_id).team_id != team_id:
        raise NotFound(f"No API key with id '{key_id}'", param="key_id")


@route(bp, "/v1/admin/keys/{key_id}", ("DELETE",), auth="admin")
def revoke_key(req: Request, key_id: str):
    return teams.revoke_key(key_id)


# A team may use only the Lambda graders registered to it (chalicelib/grading/lambda_graders.py).
@route(bp, "/v1/admin/teams/{team_id}/lambda_graders", ("POST",), auth="admin", body=RegisterLambdaGrader)
def register_lambda_grader(req: Request, team_id: str):
    teams.get_team(team_id)
    return lambda_graders.register(team_id, req.body.function_arn)


@route(bp, "/v1/admin/teams/{team_id}/lambda_graders", auth="admin")
def list_lambda_graders(req: Request, team_id: str):
    teams.get_team(team_id)
    return {"object": "list", "data": lambda_graders.list_registered(team_id)}


@route(bp, "/v1/admin/teams/{team_id}/lambda_graders/{name}", ("DELETE",), auth="admin")
def unregister_lambda_grader(req: Request, team_id: str, name: str):
    teams.get_team(team_id)
    return lambda_graders.unregister(team_id, name)


# A model the training watch quarantined (or flagged) is released by the admin with a reason
# (issue #24; docs/watch.md): recorded on the model, in its alias's history and on the bus.
@route(bp, "/v1/admin/teams/{team_id}/model_releases", ("POST",), auth="admin", body=ReleaseModel)
def release_model(req: Request, team_id: str):
    teams.get_team(team_id)
    return promotion.release(team_id, req.body.model, req.body.reason.strip() or req.body.reason)


# The audit log (issue #29; platform/audit.py). The admin sees every entry (?team_id= for one team);
# a team key (a read key included) sees its own team's entries only.
@route(bp, "/v1/admin/audit", auth="any", query={"limit": "integer", "after": "string", "team_id": "string",
                                                "action": "string", "actor": "string", "target": "string",
                                                "since": "integer", "until": "integer"})
def list_audit(req: Request):
    """Audit entries, newest first; filters: team_id (admin), action (or a prefix: 'key.'), actor, target, since, until."""
    if req.principal.is_admin:
        team_id = req.query.get("team_id") or None
        if team_id is not None and len(team_id.encode("utf-8", "surrogatepass")) > 256:
            raise InvalidRequest("'team_id' is longer than any team id.", param="team_id")
    else:
        if req.query.get("team_id") not in (None, "", req.principal.team_id):
            raise InvalidRequest("A team key sees its own team's entries only; leave out 'team_id'.", param="team_id")
        team_id = req.principal.team_id
    return audit.list_entries(team_id=team_id, limit=query_int(req, "limit", 20, 1, 100), after=req.query.get("after"),
                              action=req.query.get("action"), actor=req.query.get("actor"),
                              target=req.query.get("target"), since=req.query.get("since"),
                              until=req.query.get("until"))


# Bedrock Guardrails (issue #29; inference/guardrails.py): attached to a team, or to one of its
# aliases (which wins over the team's); every attach and detach is an audit entry.
class AttachGuardrail(StrictModel):
    guardrail_identifier: str = Field(min_length=1, max_length=2048)
    guardrail_version: str = Field(min_length=1, max_length=8)
    alias: str | None = Field(default=None, min_length=1, max_length=64)


@route(bp, "/v1/admin/teams/{team_id}/guardrails", ("PUT",), auth="admin", body=AttachGuardrail)
def attach_guardrail(req: Request, team_id: str):
    """Attach a Bedrock guardrail to the team or to one of its aliases (replacing the one there)."""
    teams.get_team(team_id)
    return guardrails.attach(team_id, req.body.guardrail_identifier, req.body.guardrail_version, req.body.alias,
                             ids.now())


@route(bp, "/v1/admin/teams/{team_id}/guardrails", auth="admin")
def list_guardrails(req: Request, team_id: str):
    teams.get_team(team_id)
    return {"object": "list", "data": guardrails.list_attached(team_id)}


@route(bp, "/v1/admin/teams/{team_id}/guardrails", ("DELETE",), auth="admin", query={"alias": "string"})
def detach_guardrail(req: Request, team_id: str):
    """Detach the team's guardrail (or, with ?alias=, the alias's)."""
    teams.get_team(team_id)
    return guardrails.detach(team_id, req.query.get("alias") or None)
