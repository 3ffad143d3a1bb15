"""Usage, prices and budgets."""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

from chalice import Blueprint, Response

from chalicelib.api.http import Request, route
from chalicelib.inference import ratelimits
from chalicelib.platform import teams
from chalicelib.spend import budgets, metering, prices

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
    report.update(spend_summary(report))
    if not req.principal.is_admin:
        report["budget"] = budgets.view(req.team_id)
    if req.query.get("format") == "csv":
        return Response(body=metering.to_csv(report), status_code=200,
                        headers={"Content-Type": "text/csv",
                                 "Content-Disposition": f"attachment; filename=usage-{report['start']}-{report['end']}.csv"})
    return report


_MICRO = Decimal("0.000001")


def _split(inference: Decimal, grader: Decimal, other: Decimal, training: Decimal) -> dict:
    amounts = {"inference_usd": inference, "grader_usd": grader, "other_calls_usd": other, "training_usd": training,
               "total_usd": inference + grader + other + training}
    return {name: str(value.quantize(_MICRO)) for name, value in amounts.items()}   # as pricing.usd writes them


def spend_summary(report: dict) -> dict:
    """What was spent in the period, budget or not (a budget only counts what it holds): model calls
    by kind (inference; grader = LLM judges), training (jobs' settled costs; a running job's hold is
    not spent yet) and the total, as exact decimal strings. `spend_by_team` splits them per team and
    is there when group_by=kind (the rows that carry each team's kinds)."""
    kinds = {k: Decimal(v) for k, v in report["spend_by_kind"].items()}
    training: dict[str, Decimal] = defaultdict(Decimal)
    for job in report["training"]:
        if job.get("settled_usd") is not None:
            training[job["team_id"]] += Decimal(job["settled_usd"])
    inference, grader = kinds.pop("inference", Decimal(0)), kinds.pop("grader", Decimal(0))
    out = {"spend_totals": _split(inference, grader, sum(kinds.values(), Decimal(0)),
                                  sum(training.values(), Decimal(0)))}
    if report["group_by"] == "kind":
        teams: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        for row in report["data"]:
            teams[row["team_id"]][row["kind"]] += Decimal(row["cost_usd"])
        for team_id in training:        # a team with training spend only is listed too
            teams.setdefault(team_id, defaultdict(Decimal))
        out["spend_by_team"] = {
            team_id: _split(by_kind.pop("inference", Decimal(0)), by_kind.pop("grader", Decimal(0)),
                            sum(by_kind.values(), Decimal(0)), training.get(team_id, Decimal(0)))
            for team_id, by_kind in sorted(teams.items())}
    return out


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


@route(bp, "/v1/admin/teams/{team_id}/limits", ("PUT",), auth="admin", json_body=True,
       schema=ratelimits.LIMITS_BODY_SCHEMA)
def set_limits(req: Request, team_id: str):
    """Requests and tokens a minute for the team, or for one of its keys (`key_id`)."""
    return ratelimits.set_limits(team_id, req.body)


@route(bp, "/v1/admin/teams/{team_id}/limits", auth="admin")
def get_limits(req: Request, team_id: str):
    return ratelimits.list_limits(team_id)


@route(bp, "/v1/admin/prices/{model}", ("PUT",), auth="admin", json_body=True)
def set_price(req: Request, model: str):
    return prices.set_override(model, req.body)


@route(bp, "/v1/admin/prices/{model}", ("DELETE",), auth="admin")
def delete_price(req: Request, model: str):
    return prices.delete_override(model)


@route(bp, "/v1/admin/prices", auth="admin")
def list_prices(req: Request):
    return {"object": "list", "data": prices.list_prices()}
