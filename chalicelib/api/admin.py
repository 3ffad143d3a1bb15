"""Admin API: teams, their keys and their Lambda graders (authenticated with the admin key)."""
from __future__ import annotations

from chalice import Blueprint
from pydantic import Field

from chalicelib.api.bodies import StrictModel
from chalicelib.api.http import Request, route
from chalicelib.evaluation import promotion
from chalicelib.grading import lambda_graders
from chalicelib.platform import teams

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


@route(bp, "/v1/admin/teams/{team_id}/keys", ("POST",), auth="admin")
def issue_key(req: Request, team_id: str):
    return 201, teams.issue_key(team_id)


@route(bp, "/v1/admin/teams/{team_id}/keys", auth="admin")
def list_keys(req: Request, team_id: str):
    return {"object": "list", "data": teams.list_keys(team_id)}


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
