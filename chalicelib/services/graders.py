"""Which Lambda Bedrock calls for a job's grader.

Today: a team's own Lambda (`{"type": "lambda"}`), checked against Bedrock's ARN pattern.
Other OpenAI grader types are explained, not silently accepted.
"""
from __future__ import annotations

from typing import Any

from chalicelib.domain import jobs as rules
from chalicelib.errors import InvalidRequest

PARAM = "method.reinforcement.grader"
_OPENAI_TYPES = {"string_check", "text_similarity", "score_model", "label_model", "multi"}


def resolve_for_bedrock(team_id: str, grader: dict[str, Any]) -> str:
    kind = grader.get("type")
    if kind == "lambda":
        return rules.check_lambda_grader(grader, PARAM)
    if kind == "python":
        raise InvalidRequest("python graders run arbitrary code and are not accepted. Package the code "
                             "as an AWS Lambda function and use {'type': 'lambda', 'lambda': "
                             "{'function': <ARN>}}.", param=f"{PARAM}.type", code="grader_not_allowed")
    if kind in _OPENAI_TYPES:
        raise InvalidRequest(f"Grader type '{kind}' is not available yet; use a 'lambda' grader.",
                             param=f"{PARAM}.type", code="grader_not_supported")
    raise InvalidRequest(f"Unknown grader type {kind!r}; use 'lambda'.", param=f"{PARAM}.type")
