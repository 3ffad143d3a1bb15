"""OpenAI-compatible fine-tuning jobs: /v1/fine_tuning/jobs."""
from __future__ import annotations

import pydantic
from chalice import Blueprint

from chalicelib.api.http import Request, query_int, route, validation_error
from chalicelib.domain.datasets import parse_json
from chalicelib.domain.jobs import CreateJob
from chalicelib.errors import InvalidRequest
from chalicelib.training import create, mirror, rollouts, state, watch

bp = Blueprint(__name__)


@route(bp, "/v1/fine_tuning/jobs", ("POST",), json_body=True)
def create_job(req: Request):
    try:
        parsed = CreateJob.model_validate(req.body)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None
    key = req.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1-255 characters.", param="Idempotency-Key")
    return create.create_job(req.team_id, parsed, req.body, key, allowed=req.principal.models)


@route(bp, "/v1/fine_tuning/jobs", query={"limit": "integer", "after": "string"})
def list_jobs(req: Request):
    metadata = None
    raw = {k[len("metadata["):-1]: v for k, v in req.query.items() if k.startswith("metadata[") and k.endswith("]")}
    if raw:
        metadata = raw
    elif req.query.get("metadata"):
        try:
            metadata = parse_json(req.query["metadata"])
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InvalidRequest("metadata must be a JSON object of strings, e.g. metadata={\"team\":\"search\"}.",
                                 param="metadata")
    return state.list_jobs(req.team_id, query_int(req, "limit", 20, 1, 100), req.query.get("after"), metadata)


@route(bp, "/v1/fine_tuning/jobs/{job_id}")
def retrieve_job(req: Request, job_id: str):
    return state.retrieve(req.team_id, job_id)


@route(bp, "/v1/fine_tuning/jobs/{job_id}/cancel", ("POST",))
def cancel_job(req: Request, job_id: str):
    return state.cancel(req.team_id, job_id)


@route(bp, "/v1/fine_tuning/jobs/{job_id}/events", query={"limit": "integer", "after": "string"})
def list_job_events(req: Request, job_id: str):
    return mirror.list_events(req.team_id, job_id, query_int(req, "limit", 20, 1, 1000), req.query.get("after"))


@route(bp, "/v1/fine_tuning/jobs/{job_id}/checkpoints", query={"limit": "integer", "after": "string"})
def list_job_checkpoints(req: Request, job_id: str):
    return mirror.list_checkpoints(req.team_id, job_id, query_int(req, "limit", 10, 1, 100), req.query.get("after"))


# ---- the training watch (rft-hub extras) ---------------------------------------------------------

@route(bp, "/v1/fine_tuning/jobs/{job_id}/rollouts",
       query={"window": "integer", "order": "string", "limit": "integer", "after": "string"})
def list_job_rollouts(req: Request, job_id: str):
    """A window's kept rollouts (full text), by reward or in a fixed random order, paged."""

    window = query_int(req, "window", 0, 1, 10**8) if req.query.get("window") not in (None, "") else None
    order = req.query.get("order") or "reward_desc"
    return rollouts.list_rollouts(req.team_id, job_id, window, order, query_int(req, "limit", 20, 1, 100),
                                  req.query.get("after"))


@route(bp, "/v1/fine_tuning/jobs/{job_id}/watch", query={"limit": "integer", "after": "string"})
def get_job_watch(req: Request, job_id: str):
    """The training watch: per-window series (paged, oldest first) and its findings."""

    return watch.view(req.team_id, job_id, query_int(req, "limit", 50, 1, 200), req.query.get("after"))
