"""Graders: OpenAI's dry-run endpoints, saved graders, and rft-hub's preflight."""
from __future__ import annotations

from typing import Any

from chalice import Blueprint
from pydantic import Field

from chalicelib.api.bodies import StrictModel
from chalicelib.api.http import Request, route
from chalicelib.domain.jobs import SampleBase
from chalicelib.grading import graders, preflight

bp = Blueprint(__name__)


class ValidateGrader(StrictModel):
    grader: Any


class RunGrader(StrictModel):
    grader: Any
    model_sample: str = Field(max_length=1_000_000)
    item: Any = None


class SaveGrader(StrictModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    grader: Any


class Preflight(StrictModel):
    grader: Any
    file_id: str = Field(min_length=1, max_length=200)
    sample_size: int = Field(default=20, ge=1, le=200)
    sample_base: SampleBase | None = None


@route(bp, "/v1/fine_tuning/alpha/graders/validate", ("POST",), body=ValidateGrader)
def validate_grader(req: Request):
    graders.compile_spec(req.body.grader, team_id=req.team_id, allowed=req.principal.models)
    return {"grader": req.body.grader}


@route(bp, "/v1/fine_tuning/alpha/graders/run", ("POST",), body=RunGrader)
def run_grader(req: Request):
    return graders.dry_run(req.body.grader, req.body.model_sample, req.body.item, req.team_id,
                           req.principal.key_id, allowed=req.principal.models)


@route(bp, "/v1/graders", ("POST",), body=SaveGrader)
def save_grader(req: Request):
    return 201, graders.save(req.team_id, req.body.name, req.body.grader, allowed=req.principal.models)


@route(bp, "/v1/graders")
def list_graders(req: Request):
    return {"object": "list", "data": graders.list_saved(req.team_id)}


@route(bp, "/v1/graders/{grader_id}")
def get_grader(req: Request, grader_id: str):
    return graders.get(req.team_id, grader_id)


@route(bp, "/v1/graders/preflight", ("POST",), body=Preflight)
def preflight_grader(req: Request):
    base = req.body.sample_base.model_dump() if req.body.sample_base is not None else None
    return preflight.run(req.team_id, req.body.grader, req.body.file_id, req.body.sample_size,
                         req.principal.key_id, sample_base=base, allowed=req.principal.models)
