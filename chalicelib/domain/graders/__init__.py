"""Graders: OpenAI-format specs compiled to runnable reward functions (pure)."""
from chalicelib.domain.graders.core import (  # noqa: F401 - the package's public names
    ERROR_KINDS,
    Deps,
    Grader,
    GraderSpecError,
    JudgeRefused,
    Result,
    build,
    calls_out,
    judge_models,
    judge_specs,
    run,
    run_text,
)
