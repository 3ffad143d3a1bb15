"""Invoking team reward Lambdas synchronously (dry runs, preflight), with one configuration.

A grader invocation gets at most LAMBDA_TIMEOUT_S and never more than the caller's request has
left; it is never retried on a timeout (a slow grader would be charged and waited for again),
only once on Lambda's own throttling, which means it did not run.
"""
from __future__ import annotations

import functools
import json
import threading
import time
from typing import Any

from botocore.config import Config
from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

from chalicelib import deadline
from chalicelib.config import settings

LAMBDA_TIMEOUT_S = 60
_lock = threading.Lock()


@functools.lru_cache(maxsize=16)
def _client(read_timeout: int):
    """One client per whole-second timeout (bounded cache): botocore fixes the timeout per client."""
    import boto3

    cfg = Config(read_timeout=read_timeout, connect_timeout=3, retries={"mode": "standard", "total_max_attempts": 1})
    with _lock:
        return boto3.session.Session().client("lambda", region_name=settings().region, config=cfg)


def invoke(function_arn: str, payload: Any) -> Any:
    """The function's JSON result. Raises TimeoutError, or RuntimeError for a function error."""
    timeout = max(1, min(LAMBDA_TIMEOUT_S, int(deadline.remaining(LAMBDA_TIMEOUT_S))))
    client = _client(timeout)
    body = json.dumps(payload).encode()
    for attempt in (1, 2):
        try:
            resp = client.invoke(FunctionName=function_arn, Payload=body)
            break
        except (ReadTimeoutError, ConnectTimeoutError):
            raise TimeoutError(f"the Lambda did not answer within {timeout} s") from None
        except client.exceptions.ResourceNotFoundException:
            raise RuntimeError(f"Lambda function not found: {function_arn}") from None
        except client.exceptions.RequestTooLargeException:
            raise RuntimeError("the request is larger than Lambda accepts (6 MB)") from None
        except client.exceptions.TooManyRequestsException:
            if attempt == 2:
                raise RuntimeError("Lambda is throttling the grader function") from None
            time.sleep(0.5)
    body = resp["Payload"].read()
    if resp.get("FunctionError"):
        raise RuntimeError(f"the function raised: {body[:300].decode(errors='replace')}")
    try:
        return json.loads(body or b"null")
    except ValueError:
        raise RuntimeError("the function returned something that is not JSON") from None
