"""Graders: OpenAI-format specs compiled to runnable reward functions (pure)."""
from chalicelib.domain.graders.core import (  # noqa: F401
    ERROR_KINDS, Deps, Grader, GraderSpecError, Result, build, run, run_text,
)
