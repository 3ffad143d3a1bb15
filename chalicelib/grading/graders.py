"""Graders as a service: checking specs, dry runs, saved (versioned) graders, and which
Lambda Bedrock calls for a job.

Declarative graders run in rft-hub's hosted grader Lambda. Their spec is stored by
content hash and referenced from every training row (`rft_grader_ref`), so the Lambda
knows which grader applies to each sample.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from pynamodb.exceptions import DoesNotExist, PutError, UpdateError

from chalicelib.adapters import lambdas
from chalicelib.domain import ids, numbers
from chalicelib.domain.graders import ERROR_KINDS, Deps, Grader, GraderSpecError, JudgeRefused, build, run_text
from chalicelib.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from chalicelib.grading import lambda_graders
from chalicelib.inference import judge
from chalicelib.store import dynamo
from chalicelib.store.models import GraderSpec, GraderVersion, SavedGrader

PARAM = "method.reinforcement.grader"


def deps(team_id: str, *, key_id: str | None = None, job_id: str | None = None,
         spent: list | None = None) -> Deps:
    """What a team's graders may call: judges through the gateway's metering and budget (the
    team's models only), and Lambda graders (registered to the team, checked at compile time)."""
    from chalicelib.inference import judge  # the gateway's imports are not needed by every grader path

    return Deps(judge=judge.judge(team_id, key_id=key_id, job_id=job_id, spent=spent),
                invoke_lambda=lambdas.invoke)


def compile_spec(spec: Any, param: str = "grader", team_id: str | None = None, allowed=None) -> Grader:
    """`allowed`: the calling key's model list (None: any), for the judges the spec names."""
    try:
        grader = build(spec, param)
    except GraderSpecError as exc:
        raise InvalidRequest(f"Invalid grader: {exc}.", param=exc.param, code="invalid_grader") from None
    # Lambda graders: only functions registered to the team (grading/lambda_graders.py); without a
    # team_id, still only functions registered to some team.
    lambda_graders.check(team_id, grader, param)
    if team_id is not None:
        judge.check_judges(team_id, spec, param, allowed)
    return grader


# ---- dry runs (OpenAI's /fine_tuning/alpha/graders endpoints) ----------------------------------

def run_view(grader: Grader, result, seconds: float) -> dict:
    errors = {kind: kind in result.errors for kind in ERROR_KINDS}
    errors["model_grader_server_error_details"] = result.details if "model_grader_server_error" in result.errors \
        else None
    errors["python_grader_runtime_error_details"] = None
    errors["python_grader_server_error_type"] = None
    errors["details"] = result.details
    return {"reward": result.reward, "sub_rewards": result.sub_rewards,
            "metadata": {"name": grader.name, "type": grader.type, "errors": errors,
                         "execution_time": round(seconds, 6), "scores": {grader.name: result.reward,
                                                                         **result.sub_rewards},
                         "token_usage": result.token_usage or None, "sampled_model_name": result.model},
            "model_grader_token_usage_per_model": {result.model: result.token_usage} if result.model else {}}


def dry_run(spec: Any, model_sample: str, item: Any, team_id: str, key_id: str | None = None,
            allowed=None) -> dict:
    grader = compile_spec(spec, team_id=team_id, allowed=allowed)
    if item is not None and not isinstance(item, dict):
        raise InvalidRequest("item must be an object.", param="item")
    try:
        result, seconds = run_text(grader, model_sample, item or {}, deps(team_id, key_id=key_id))
    except JudgeRefused as refused:
        raise refused.error from None          # out of budget: the 429, not a graded error
    return run_view(grader, result, seconds)


# ---- stored specs and saved graders ------------------------------------------------------------

def _canonical(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def store_spec(spec: dict) -> str:
    """Stores an (already checked) spec by content hash; returns its reference."""
    digest = hashlib.sha256(_canonical(spec).encode()).hexdigest()[:32]
    try:
        GraderSpec(digest, spec=spec, created_at=ids.now()).save(condition=GraderSpec.spec_hash.does_not_exist())
    except PutError as exc:
        if not dynamo.is_condition(exc):
            raise
    return f"spec:{digest}"


def load_spec(ref: str) -> dict:
    if not isinstance(ref, str) or not ref.startswith("spec:"):
        raise KeyError(ref)
    return GraderSpec.get(ref[5:], consistent_read=True).spec


def version_view(v: GraderVersion, spec: dict | None = None) -> dict:
    return {"id": v.grader_id, "object": "grader", "name": v.name, "version": v.version,
            "created_at": v.created_at, "grader": spec if spec is not None else load_spec(f"spec:{v.spec_hash}")}


def save(team_id: str, name: str, spec: dict, allowed=None) -> dict:
    compile_spec(spec, team_id=team_id, allowed=allowed)
    ref = store_spec(spec)
    now = ids.now()
    for _ in range(5):   # optimistic: the version number is claimed with a conditional write
        try:
            current = SavedGrader.get(team_id, name, consistent_read=True)
            version = current.latest_version + 1
            current.update(actions=[SavedGrader.latest_version.set(version), SavedGrader.updated_at.set(now)],
                           condition=SavedGrader.latest_version == current.latest_version)
            grader_id = current.grader_id
        except DoesNotExist:
            grader_id, version = ids.new_id("grader", 8), 1
            try:
                SavedGrader(team_id, name, grader_id=grader_id, latest_version=1, created_at=now,
                            updated_at=now).save(condition=SavedGrader.name.does_not_exist())
            except PutError:
                continue
        except UpdateError:
            continue
        record = GraderVersion(grader_id, version, team_id=team_id, name=name, spec_hash=ref[5:], created_at=now)
        record.save()
        return version_view(record, spec)
    raise Conflict(f"Grader '{name}' is being saved concurrently; retry.", param="name")


def _versions(team_id: str, grader_id: str) -> list[GraderVersion]:
    versions = [v for v in GraderVersion.query(grader_id, scan_index_forward=False) if v.team_id == team_id]
    if not versions:
        raise NotFound(f"No grader '{grader_id}'.", param="grader_id")
    return versions


def get(team_id: str, grader_id: str, version: int | None = None) -> dict:
    versions = _versions(team_id, grader_id)
    chosen = versions[0] if version is None else next((v for v in versions if v.version == version), None)
    if chosen is None:
        raise NotFound(f"Grader '{grader_id}' has no version {version}.", param="version")
    return {**version_view(chosen), "versions": [v.version for v in versions]}


def list_saved(team_id: str) -> list[dict]:
    out = []
    for g in SavedGrader.query(team_id):
        v = GraderVersion.get(g.grader_id, g.latest_version)
        out.append({**version_view(v), "versions": list(range(1, g.latest_version + 1))})
    return out


# ---- jobs ---------------------------------------------------------------------------------------

def hosted_grader_arn() -> str:
    # Set by the deploy template (the hosted_grader function's ARN) and by the local stage.
    configured = os.environ.get("RFT_HOSTED_GRADER_ARN")
    if not configured:
        raise ServiceUnavailable("Hosted graders are not configured on this deployment (RFT_HOSTED_GRADER_ARN).")
    return configured


def resolve(team_id: str, grader: dict[str, Any], allowed=None) -> tuple[dict, str, str | None]:
    """(spec, Lambda ARN for Bedrock, grader ref) for a job's grader.

    Every reward goes through rft-hub: Bedrock is always given the hosted grader, and every row
    references the spec (stored by hash). A team's own Lambda grader (type `lambda`) is such a
    spec too: it names the team's function, which the hosted grader invokes with Bedrock's
    contract (training/hosted_grader.py), so the rollouts are recorded and watched."""
    if isinstance(grader, dict) and grader.get("type") == "saved":
        extra = set(grader) - {"type", "id", "version"}
        if extra or not isinstance(grader.get("id"), str):
            raise InvalidRequest("A saved grader is {'type': 'saved', 'id': <grader id>, 'version': <n>}.",
                                 param=PARAM)
        version = grader.get("version")
        if version is not None and (isinstance(version, float) or numbers.finite(version, integer=True) is None
                                    or abs(version) >= 10 ** 9):     # a 401-digit key is DynamoDB's 500
            raise InvalidRequest("version must be an integer.", param=f"{PARAM}.version")
        spec = get(team_id, grader["id"], version)["grader"]
    else:
        spec = grader
    compile_spec(spec, PARAM, team_id, allowed)
    return spec, hosted_grader_arn(), store_spec(spec)
