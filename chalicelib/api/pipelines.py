"""Pipelines (issue #27): retraining that runs itself, on Step Functions, gated by evals and
approved by a person in Slack. rft-hub's own API (OpenAI has none): docs/pipelines.md."""
from __future__ import annotations

from chalice import Blueprint

from chalicelib.api.http import Request, query_int, route
from chalicelib.errors import Forbidden, InvalidRequest
from chalicelib.pipelines import approval, runs, specs
from chalicelib.platform import teams

bp = Blueprint(__name__)

LIST_QUERY = {"limit": "integer", "after": "string"}
SPEC = {"type": "object", "properties": {
    "name": {"type": "string"}, "dataset": {"type": "object"}, "job": {"type": "object"}, "eval": {"type": "object"},
    "target_alias": {"type": "string"}, "approval": {"type": "object"}, "triggers": {"type": "object"},
    "metadata": {"type": "object"}}}
CREATE = {**SPEC, "required": ["name", "dataset", "job", "eval", "target_alias"]}


def _who(req: Request) -> str | None:
    p = req.principal
    return None if p is None else ("admin" if p.is_admin else f"key:{p.key_id}")


@route(bp, "/v1/pipelines", ("POST",), json_body=True, schema=CREATE)
def create_pipeline(req: Request):
    return 201, specs.create(req.team_id, req.body, _who(req), req.principal.models)


@route(bp, "/v1/pipelines", query=LIST_QUERY)
def list_pipelines(req: Request):
    return specs.list_pipelines(req.team_id, query_int(req, "limit", 20, 1, 100), req.query.get("after"))


@route(bp, "/v1/pipelines/{pipeline_id}", query={"version": "integer"})
def retrieve_pipeline(req: Request, pipeline_id: str):
    return specs.retrieve(req.team_id, pipeline_id, req.query.get("version"))


@route(bp, "/v1/pipelines/{pipeline_id}", ("PATCH",), json_body=True, schema=SPEC)
def update_pipeline(req: Request, pipeline_id: str):
    return specs.update(req.team_id, pipeline_id, req.body, _who(req), req.principal.models)


@route(bp, "/v1/pipelines/{pipeline_id}", ("DELETE",))
def delete_pipeline(req: Request, pipeline_id: str):
    return specs.delete(req.team_id, pipeline_id)


@route(bp, "/v1/pipelines/{pipeline_id}/versions")
def pipeline_versions(req: Request, pipeline_id: str):
    return specs.versions(req.team_id, pipeline_id)


@route(bp, "/v1/pipelines/{pipeline_id}/uploads", ("POST",), json_body=True,
       schema={"type": "object", "properties": {"filename": {"type": "string"}}})
def pipeline_upload(req: Request, pipeline_id: str):
    body = req.body or {}
    extra = sorted(set(body) - {"filename"})
    if extra:
        raise InvalidRequest(f"Unknown field '{extra[0]}'.", param=extra[0])
    return 201, specs.upload_url(req.team_id, pipeline_id, body.get("filename"))


@route(bp, "/v1/pipelines/{pipeline_id}/runs", ("POST",))
def start_pipeline_run(req: Request, pipeline_id: str):
    return runs.manual(req.team_id, pipeline_id, _who(req), req.headers.get("idempotency-key"))


@route(bp, "/v1/pipelines/{pipeline_id}/runs", query=LIST_QUERY)
def list_pipeline_runs(req: Request, pipeline_id: str):
    return runs.list_runs(req.team_id, pipeline_id, query_int(req, "limit", 20, 1, 100), req.query.get("after"))


@route(bp, "/v1/pipelines/{pipeline_id}/runs/{run_id}")
def retrieve_pipeline_run(req: Request, pipeline_id: str, run_id: str):
    return runs.retrieve(req.team_id, pipeline_id, run_id)


@route(bp, "/v1/pipelines/{pipeline_id}/runs/{run_id}/approve", ("POST",))
def approve_pipeline_run(req: Request, pipeline_id: str, run_id: str):
    return _decide(req, pipeline_id, run_id, "approve")


@route(bp, "/v1/pipelines/{pipeline_id}/runs/{run_id}/reject", ("POST",))
def reject_pipeline_run(req: Request, pipeline_id: str, run_id: str):
    return _decide(req, pipeline_id, run_id, "reject")


def _decide(req: Request, pipeline_id: str, run_id: str, decision: str) -> dict:
    """The console's (or any client's) Approve and Reject: the caller is the approver its key's owner names
    (a listed Slack user id), so a decision there is the same person's as in Slack."""
    owner = teams.key_owner(req.principal.key_id) if req.principal.key_id else None
    if not owner:
        raise Forbidden("Only a key whose owner is one of the pipeline's approvers (a Slack user id) may decide.",
                        param="owner", code="not_an_approver")
    via = "console" if req.principal.session_id else "api"
    return approval.decide(req.team_id, pipeline_id, run_id, decision, owner, via)
