"""What a worker's failure means, decided once (issue #23): retried, or final.

Only throttles, 5xx and timeouts are worth another attempt (Bedrock, DynamoDB busy or silent,
S3 or SQS unreachable). Not found, every other 4xx and anything unexpected (a bug, a value no
attempt will read differently) are final: the job or run they happened to fails with a clear
error and releases what it holds, instead of being retried for ever with money held.
"""
from __future__ import annotations

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pynamodb.exceptions import PynamoDBException

from chalicelib.errors import ApiError, InternalError
from chalicelib.store import dynamo

_S3_TRANSIENT = {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError", "RequestTimeTooSkewed"}


def retryable(exc: BaseException) -> bool:
    """The one classification of a worker's failure: only throttles, 5xx and timeouts (Bedrock,
    DynamoDB busy or silent, S3 or SQS unreachable) are retried; not found, every other 4xx and
    anything unexpected fail the job, which releases its hold."""
    if isinstance(exc, ApiError):
        return exc.status == 429 or exc.status >= 500 and not isinstance(exc, InternalError)
    if isinstance(exc, PynamoDBException):
        return dynamo.classify(exc) in (dynamo.BUSY, dynamo.UNKNOWN)
    if isinstance(exc, ClientError):
        meta = exc.response.get("ResponseMetadata") or {}
        code = (exc.response.get("Error") or {}).get("Code") or ""
        return int(meta.get("HTTPStatusCode") or 0) >= 500 or "Throttl" in code or code in _S3_TRANSIENT
    # A connection or read timeout (never an answer); other botocore errors (bad parameters, no
    # credentials) are the same on every attempt.
    return isinstance(exc, (BotoConnectionError, HTTPClientError))
