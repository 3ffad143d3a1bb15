"""Slack: verified slash commands and per-team Slack settings."""
from __future__ import annotations

from chalice import Blueprint

from chalicelib.api.http import Request, route
from chalicelib.platform import teams
from chalicelib.slack import commands as slack_commands
from chalicelib.slack import interactions as slack_interactions
from chalicelib.slack import notifications as slack

bp = Blueprint(__name__)


@route(bp, "/slack/commands", ("POST",), auth=None, consumes="application/x-www-form-urlencoded")
def slash_command(req: Request):
    # Verified against the raw body with the app's signing secret; 401 on any failure.
    return slack_commands.command(slack_commands.verify(req.raw_body, req.headers))


@route(bp, "/slack/interactions", ("POST",), auth=None, consumes="application/x-www-form-urlencoded")
def slack_interaction(req: Request):
    # Buttons (a pipeline's approval): verified exactly as slash commands are.
    return slack_interactions.handle(slack_commands.verify(req.raw_body, req.headers))


@route(bp, "/v1/admin/teams/{team_id}/slack", ("PUT",), auth="admin", json_body=True)
def configure_slack(req: Request, team_id: str):
    teams.get_team(team_id)
    return slack.configure(team_id, req.body)


@route(bp, "/v1/admin/teams/{team_id}/slack", auth="admin")
def get_slack(req: Request, team_id: str):
    teams.get_team(team_id)
    return slack.config_view(team_id)
