"""Domain events: facts in the past tense that one context announces and a higher one reacts to
(chalicelib/bus.py calls the handlers chalicelib/wiring.py lists). Ids only, and what the reaction
needs that is not stored yet."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobAccepted:
    """A fine-tuning job is about to be recorded (before its record exists): a handler may still
    refuse it with a 400 naming the field (an `rft_eval` that names no eval of the team)."""
    team_id: str
    job_id: str
    rft_eval: dict | None


@dataclass(frozen=True)
class JobSucceeded:
    """A job's model is registered and servable (not quarantined by the training watch). Emitted
    by every finalize until it completes, so handlers are idempotent."""
    team_id: str
    job_id: str


@dataclass(frozen=True)
class JobEnded:
    """A job reached its end (succeeded, failed or cancelled) and its finalize got this far:
    `served` says whether its model is callable. Emitted by every finalize until it completes."""
    team_id: str
    job_id: str
    status: str
    served: bool
    pipeline_run: str | None = None      # "<pipeline id>/<run id>" when a pipeline run made the job


@dataclass(frozen=True)
class EvalRunEnded:
    """An eval run reached its end (completed, failed or canceled)."""
    team_id: str
    eval_id: str
    run_id: str
    pipeline_run: str | None = None
