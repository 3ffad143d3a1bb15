"""OpenAI's Evals API: /v1/evals, its runs and their output items, and rft-hub's comparison view."""
from __future__ import annotations

import pydantic
from chalice import Blueprint

from chalicelib.api.http import Request, query_int, route, validation_error
from chalicelib.domain import evals as rules
from chalicelib.evaluation import evals

bp = Blueprint(__name__)

LIST_QUERY = {"limit": "integer", "after": "string", "order": "string"}
CREATE_EVAL = {"type": "object", "required": ["data_source_config", "testing_criteria"], "properties": {
    "name": {"type": "string"}, "metadata": {"type": "object"}, "data_source_config": {"type": "object"},
    "testing_criteria": {"type": "array", "items": {"type": "object"}}}}
UPDATE_EVAL = {"type": "object", "properties": {"name": {"type": "string"}, "metadata": {"type": "object"}}}
CREATE_RUN = {"type": "object", "required": ["data_source"], "properties": {
    "name": {"type": "string"}, "metadata": {"type": "object"}, "data_source": {"type": "object"},
    "rft_max_usd": {"type": "string"}}}


def _parse(model: type[pydantic.BaseModel], body):
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None


def _base_url(req: Request) -> str:
    """Where the caller reached rft-hub (the run's report_url points there); "" if unknown."""
    host = req.headers.get("host")
    if not host:
        return ""
    proto = (req.headers.get("x-forwarded-proto") or ("http" if host.startswith(("127.0.0.1", "localhost"))
                                                     else "https")).split(",")[0].strip()
    context = getattr(bp.current_request, "context", None) or {}
    stage, path = context.get("stage"), context.get("path") or ""
    prefix = f"/{stage}" if stage and path.startswith(f"/{stage}/") else ""
    return f"{proto}://{host}{prefix}"


# ---- evals --------------------------------------------------------------------------------------

@route(bp, "/v1/evals", ("POST",), json_body=True, schema=CREATE_EVAL)
def create_eval(req: Request):
    """Create an eval: an item schema and testing criteria."""
    return 201, evals.create_eval(req.team_id, _parse(rules.CreateEval, req.body), allowed=req.principal.models)


@route(bp, "/v1/evals", query={**LIST_QUERY, "order_by": "string"})
def list_evals(req: Request):
    return evals.list_evals(req.team_id, query_int(req, "limit", 20, 1, 100), req.query.get("after"),
                            req.query.get("order"), req.query.get("order_by"))


@route(bp, "/v1/evals/{eval_id}")
def retrieve_eval(req: Request, eval_id: str):
    return evals.retrieve_eval(req.team_id, eval_id)


@route(bp, "/v1/evals/{eval_id}", ("POST",), json_body=True, schema=UPDATE_EVAL)
def update_eval(req: Request, eval_id: str):
    return evals.update_eval(req.team_id, eval_id, _parse(rules.UpdateEval, req.body))


@route(bp, "/v1/evals/{eval_id}", ("DELETE",))
def delete_eval(req: Request, eval_id: str):
    return evals.delete_eval(req.team_id, eval_id)


@route(bp, "/v1/evals/{eval_id}/compare", query={"runs": "string", "limit": "integer"})
def compare_runs(req: Request, eval_id: str):
    """Compare two runs: per criterion deltas and the items where they disagree most."""
    return evals.compare(req.team_id, eval_id, req.query.get("runs"), query_int(req, "limit", 10, 1, 100))


# ---- runs ---------------------------------------------------------------------------------------

@route(bp, "/v1/evals/{eval_id}/runs", ("POST",), json_body=True, schema=CREATE_RUN)
def create_run(req: Request, eval_id: str):
    """Start a run of the eval on a model (or on given outputs)."""
    status, view = evals.create_run(req.team_id, eval_id, _parse(rules.CreateRun, req.body), req.principal.key_id,
                                    allowed=req.principal.models)
    view["report_url"] = _base_url(req) + view["report_url"]
    return status, view


@route(bp, "/v1/evals/{eval_id}/runs", query={**LIST_QUERY, "status": "string"})
def list_runs(req: Request, eval_id: str):
    return evals.list_runs(req.team_id, eval_id, query_int(req, "limit", 20, 1, 100), req.query.get("after"),
                           req.query.get("order"), req.query.get("status"))


@route(bp, "/v1/evals/{eval_id}/runs/{run_id}")
def retrieve_run(req: Request, eval_id: str, run_id: str):
    return evals.retrieve_run(req.team_id, eval_id, run_id, _base_url(req))


@route(bp, "/v1/evals/{eval_id}/runs/{run_id}", ("POST",))
def cancel_run(req: Request, eval_id: str, run_id: str):
    """Cancel a run (the path in OpenAI's document)."""
    return evals.cancel_run(req.team_id, eval_id, run_id, _base_url(req))


@route(bp, "/v1/evals/{eval_id}/runs/{run_id}/cancel", ("POST",))
def cancel_run_sdk(req: Request, eval_id: str, run_id: str):
    """Cancel a run (the path the openai SDK calls)."""
    return evals.cancel_run(req.team_id, eval_id, run_id, _base_url(req))


@route(bp, "/v1/evals/{eval_id}/runs/{run_id}", ("DELETE",))
def delete_run(req: Request, eval_id: str, run_id: str):
    return evals.delete_run(req.team_id, eval_id, run_id)


@route(bp, "/v1/evals/{eval_id}/runs/{run_id}/output_items", query={**LIST_QUERY, "status": "string"})
def list_output_items(req: Request, eval_id: str, run_id: str):
    return evals.list_items(req.team_id, eval_id, run_id, query_int(req, "limit", 20, 1, 100),
                            req.query.get("after"), req.query.get("order"), req.query.get("status"))


@route(bp, "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}")
def retrieve_output_item(req: Request, eval_id: str, run_id: str, output_item_id: str):
    return evals.retrieve_item(req.team_id, eval_id, run_id, output_item_id)
