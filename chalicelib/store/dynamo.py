"""What a DynamoDB failure means, decided in one place, and the one retry loop.

Every failure is one of:
- CONDITION: the write's condition was false. A business answer (over budget, already
  settled, a duplicate, a lost race); only the caller knows which, so it is re-raised.
- BUSY: DynamoDB refused the call and did not apply it (transaction conflict, throttling,
  request limit). Safe to retry any call: retried with jittered backoff inside the request's
  remaining time, then answered as 503 `service_unavailable` with Retry-After.
- UNKNOWN: the call may or may not have been applied (a 5xx, a read timeout, a dropped
  connection). Retried only when the caller says the write is idempotent (keyed by a hold
  id, a request id, a conditional put); otherwise answered as 503 at once, never repeated
  blindly -- a repeated ADD would count twice.
- ERROR: anything else (a validation error, a missing table): a bug or bad input, re-raised.

PynamoDB's and botocore's own retries are switched off (store/models.py), so this loop is
the only one and it knows which writes are idempotent.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from pynamodb.exceptions import PynamoDBException

from chalicelib import deadline
from chalicelib.config import settings
from chalicelib.errors import ServiceUnavailable
from chalicelib.log import logger

T = TypeVar("T")

CONDITION, BUSY, UNKNOWN, ERROR = "condition", "busy", "unknown", "error"

_BUSY_CODES = {"TransactionConflictException", "ProvisionedThroughputExceededException", "ThrottlingException",
               "RequestLimitExceeded", "TransactionInProgressException"}
_BUSY_REASONS = {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"}
_UNKNOWN_CODES = {"InternalServerError", "ServiceUnavailable", "InternalFailure"}
_NOT_SENT = (EndpointConnectionError, ConnectTimeoutError)       # never reached DynamoDB
_MAYBE_SENT = (ReadTimeoutError, ConnectionClosedError)

BASE_DELAY_S = 0.02
MAX_DELAY_S = 1.0
RETRY_AFTER_S = 1


def reasons(exc: BaseException) -> list[str]:
    """Cancellation reason codes of a cancelled transaction, in item order ('None' where fine)."""
    found = getattr(getattr(exc, "cause", None), "cancellation_reasons", None) or []
    return [getattr(r, "code", None) or "None" for r in found]


def response_code(exc: BaseException) -> str | None:
    """DynamoDB's error code, or None (a timeout's cause has `response = None`, which PynamoDB's
    own `cause_response_code` trips over)."""
    response = getattr(getattr(exc, "cause", None), "response", None)
    return (response.get("Error") or {}).get("Code") if isinstance(response, dict) else None


def classify(exc: BaseException) -> str:
    if not isinstance(exc, PynamoDBException):
        return ERROR
    code = response_code(exc)
    if code == "ConditionalCheckFailedException":
        return CONDITION
    if code == "TransactionCanceledException":
        codes = set(reasons(exc))
        if codes & _BUSY_REASONS:
            return BUSY        # nothing in a cancelled transaction is applied
        if "ConditionalCheckFailed" in codes:
            return CONDITION
        return ERROR
    if code in _BUSY_CODES:
        return BUSY
    if code in _UNKNOWN_CODES:
        return UNKNOWN
    cause = getattr(exc, "cause", None)
    if isinstance(cause, _NOT_SENT):
        return BUSY
    if isinstance(cause, _MAYBE_SENT):
        return UNKNOWN
    return ERROR


class StoreBusy(ServiceUnavailable):
    """DynamoDB stayed busy (or silent) for the whole time this request had."""
    code = "service_unavailable"


def busy_error(what: str) -> StoreBusy:
    return StoreBusy(f"rft-hub's database is busy ({what}); nothing was charged for this attempt. Retry shortly.",
                     headers={"Retry-After": str(RETRY_AFTER_S)})


def call(op: Callable[[], T], *, idempotent: bool, what: str, max_attempts: int = 10) -> T:
    """Runs `op` until it succeeds, fails for good, or the request's time runs out.

    CONDITION and ERROR failures are re-raised unchanged for the caller; BUSY (and UNKNOWN
    when `idempotent`) are retried with full-jitter backoff; giving up raises StoreBusy (503)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return op()
        except PynamoDBException as exc:
            kind = classify(exc)
            if kind in (CONDITION, ERROR):
                raise
            if kind == UNKNOWN and not idempotent:
                logger.warning("dynamodb outcome unknown; not repeated", extra={"op": what})
                raise busy_error(what) from None
            pause = random.uniform(0, min(MAX_DELAY_S, BASE_DELAY_S * 2 ** attempt))
            # Another attempt only if it can finish (a stalled DynamoDB takes the whole read timeout).
            if attempt >= max_attempts or deadline.remaining() <= pause + settings().dynamodb_read_timeout_seconds:
                logger.warning("dynamodb busy; giving up", extra={"op": what, "attempts": attempt,
                                                                  "code": response_code(exc)})
                raise busy_error(what) from None
            time.sleep(pause)


def get_or_none(model, hash_key, range_key=None, *, what: str, consistent_read: bool = False):
    """One item by its key (a read, retried as `call` retries), or None when there is none."""
    try:
        return call(lambda: model.get(hash_key, range_key, consistent_read=consistent_read), idempotent=True,
                    what=what)
    except model.DoesNotExist:
        return None


def is_condition(exc: BaseException) -> bool:
    return classify(exc) == CONDITION


def is_busy(exc: BaseException) -> bool:
    """Throttled, conflicted or silent: nothing decided, the same write may succeed when repeated."""
    return classify(exc) in (BUSY, UNKNOWN)


def put_once(item, key_attribute, what: str) -> bool:
    """Writes `item` only if its key is new; retried as an idempotent write. True if this call
    wrote it, False if it was there already (a repeat, a replay, a racing writer)."""
    from pynamodb.exceptions import PutError

    try:
        call(lambda: item.save(condition=key_attribute.does_not_exist()), idempotent=True, what=what)
        return True
    except PutError as exc:
        if is_condition(exc):
            return False
        raise
