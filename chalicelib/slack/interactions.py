"""Slack's interactivity requests (issue #27): a click on a pipeline approval's Approve or Reject
button. Verified like slash commands (signing secret, timestamp window); only the pipeline's listed
approvers decide (anyone else gets an ephemeral refusal), once; the message is then replaced by
who decided. Answers go through the request's `response_url`."""
from __future__ import annotations

import json

from chalicelib.adapters import slack as slack_http
from chalicelib.domain import slack_messages as messages
from chalicelib.errors import ApiError, InvalidRequest
from chalicelib.log import logger
from chalicelib.pipelines import approval
from chalicelib.slack import notifications
from chalicelib.store import dynamo
from chalicelib.store.models import SlackConfig

ACTIONS = {messages.APPROVE: "approve", messages.REJECT: "reject"}


def handle(form: dict) -> dict:
    """`form`: the verified request's fields (Slack sends one, `payload`, a JSON document)."""
    try:
        payload = json.loads(form.get("payload") or "")
    except ValueError:
        raise InvalidRequest("payload must be Slack's interaction JSON.", param="payload") from None
    if not isinstance(payload, dict) or payload.get("type") != "block_actions":
        return {}
    actions = payload.get("actions") if isinstance(payload.get("actions"), list) else []
    action = actions[0] if actions and isinstance(actions[0], dict) else {}
    decision = ACTIONS.get(action.get("action_id"))
    parts = str(action.get("value") or "").split("/")
    user = (payload.get("user") or {}).get("id") if isinstance(payload.get("user"), dict) else None
    response_url = payload.get("response_url") if isinstance(payload.get("response_url"), str) else ""
    if decision is None or len(parts) != 3 or not isinstance(user, str):
        return {}
    team_id, pipeline_id, run_id = parts
    workspace = (payload.get("team") or {}).get("id") if isinstance(payload.get("team"), dict) else None
    linked = dynamo.get_or_none(SlackConfig, team_id, what="slack config")
    if linked is not None and linked.slack_team_id and workspace and workspace != linked.slack_team_id:
        # a click from another workspace than the team's: never a decision
        _answer(response_url, {"replace_original": False, **messages.ephemeral(
            "This button belongs to another Slack workspace's team.")})
        return {}
    try:
        result = approval.decide(team_id, pipeline_id, run_id, decision, user, via="slack")
    except ApiError as err:
        if err.status >= 500:
            raise
        _answer(response_url, {"replace_original": False, **messages.ephemeral(err.message)})
        return {}
    run = result["run"]
    detail = {"pipeline_id": pipeline_id, "run_id": run_id}
    if result["decided"] or result["late"]:
        _answer(response_url, messages.pipeline_decided_message(detail, decision, user, result["late"]))
    else:
        _answer(response_url, {"replace_original": False, **messages.ephemeral(
            f"Already {messages.DECIDED[run['approval']['decision']]} by <@{run['approval']['by']}>.")})
    return {}


def _answer(url: str, message: dict) -> None:
    if not notifications.allowed_url(url):
        logger.warning("interaction response_url refused", extra={"host": url[:40]})
        return
    try:
        slack_http.post(url, message)
    except Exception as exc:  # noqa: BLE001 - the decision is made and recorded; the message is a courtesy
        logger.warning("interaction answer not posted", extra={"error": type(exc).__name__})
