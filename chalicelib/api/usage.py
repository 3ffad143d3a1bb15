"""Usage, prices and budgets."""
from __future__ import annotations

from chalice import Blueprint, Response

from chalicelib.api.http import Request, route
from chalicelib.services import budgets, metering, prices, teams

bp = Blueprint(__name__)


@route(bp, "/v1/usage", auth="any", produces="text/csv",
       query={"start": "string", "end": "string", "group_by": "string", "format": "string", "team_id": "string"})
def usage(req: Request):
    """Team-scoped with a team key; every team (or ?team_id=) with the admin key."""
    if req.principal.is_admin:
        team_ids = [req.query["team_id"]] if req.query.get("team_id") else metering.all_team_ids()
    else:
        team_ids = [req.team_id]
    report = metering.report(team_ids, req.query.get("start"), req.query.get("end"), req.query.get("group_by", "day"))
    if not req.principal.is_admin:
        report["budget"] = budgets.view(req.team_id)
    if req.query.get("format") == "csv":
        return Response(body=metering.to_csv(report), status_code=200,
                        headers={"Content-Type": "text/csv",
                                 "Content-Disposition": f"attachment; filename=usage-{report['start']}-{report['end']}.csv"})
    return report


@route(bp, "/v1/budget")
def team_budget(req: Request):
    return budgets.view(req.team_id)


@route(bp, "/v1/admin/teams/{team_id}/budget", ("PUT",), auth="admin", json_body=True)
def set_budget(req: Request, team_id: str):
    teams.get_team(team_id)
    return budgets.set_budget(team_id, req.body)


@route(bp, "/v1/admin/teams/{team_id}/budget", auth="admin")
def get_budget(req: Request, team_id: str):
    teams.get_team(team_id)
    return budgets.view(team_id)


@route(bp, "/v1/admin/prices/{model}", ("PUT",), auth="admin", json_body=True)
def set_price(req: Request, model: str):
    return prices.set_override(model, req.body)


@route(bp, "/v1/admin/prices/{model}", ("DELETE",), auth="admin")
def delete_price(req: Request, model: str):
    return prices.delete_override(model)


@route(bp, "/v1/admin/prices", auth="admin")
def list_prices(req: Request):
    return {"object": "list", "data": prices.list_prices()}
