"""Invoking Lambda functions synchronously (team reward Lambdas for dry runs and preflight)."""
from __future__ import annotations

import json
from typing import Any

from botocore.config import Config
from botocore.exceptions import ReadTimeoutError

from chalicelib.adapters import aws

_TIMEOUT_CONFIG = Config(read_timeout=60, connect_timeout=3, retries={"mode": "standard", "max_attempts": 2})


def invoke(function_arn: str, payload: Any) -> Any:
    """The function's JSON result. Raises TimeoutError, or RuntimeError for a function error."""
    client = aws.lambda_()
    try:
        resp = client.invoke(FunctionName=function_arn, Payload=json.dumps(payload).encode())
    except ReadTimeoutError:
        raise TimeoutError("the Lambda did not answer within 60 s") from None
    except client.exceptions.ResourceNotFoundException:
        raise RuntimeError(f"Lambda function not found: {function_arn}") from None
    body = resp["Payload"].read()
    if resp.get("FunctionError"):
        raise RuntimeError(f"the function raised: {body[:300].decode(errors='replace')}")
    try:
        return json.loads(body or b"null")
    except ValueError:
        raise RuntimeError("the function returned something that is not JSON") from None
