"""Unauthenticated health and the caller's own identity."""
from __future__ import annotations

from chalice import Blueprint

from chalicelib.api.http import Request, route
from chalicelib.platform import health, teams

bp = Blueprint(__name__)


@route(bp, "/health", auth=None)
def get_health(req: Request):
    report = health.report()
    return (200 if report["status"] == "ok" else 503), report


@route(bp, "/v1/me")
def whoami(req: Request):
    return {"object": "principal", "team": teams.team_view(teams.get_team(req.team_id)),
            "key_id": req.principal.key_id}
