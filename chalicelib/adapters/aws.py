"""Lazily created boto3 clients, their timeouts fitted to the caller's deadline.

Endpoints are never configured here: botocore reads AWS_ENDPOINT_URL_<SERVICE>
(set by the local stack and the tests), and uses the real AWS endpoints when unset.
Clients are cached per process so warm Lambda invocations reuse connections.

botocore fixes a client's timeouts when it is made, so there is one client per timeout step
(a bounded set): a request with 27 s left gets two attempts of at most 2 s to connect and 8 s
to answer (~20 s), one with 6 s left a single attempt that ends within them. A stalled S3, SQS,
EventBridge or Secrets Manager (no answer, or no connection) is then a 503 `service_unavailable`
with `x-should-retry` (as a stalled DynamoDB is), never a 500 after the caller has gone.
"""
from __future__ import annotations

import functools
import math
import threading

from botocore.config import Config
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError
from botocore.response import StreamingBody

from chalicelib import deadline
from chalicelib.config import settings
from chalicelib.errors import ServiceUnavailable

_lock = threading.Lock()

CONNECT_S, READ_S, ATTEMPTS = 2.0, 8.0, 2     # with time to spare (workers, the reconciler)
ANSWER_MARGIN_S = 1.0                         # kept to answer after the last wait
BACKOFF_S = 1.0                               # botocore's standard mode sleeps up to 1 s before attempt 2
STEP_S = 0.5                                  # timeouts rounded down to this: a bounded set of clients
_NAMES = {"s3": "Amazon S3", "sqs": "Amazon SQS", "events": "Amazon EventBridge",
          "secretsmanager": "AWS Secrets Manager", "stepfunctions": "AWS Step Functions",
          "scheduler": "Amazon EventBridge Scheduler"}


def timeouts(remaining: float) -> tuple[float, float, int]:
    """(connect timeout, read timeout, attempts) whose worst case, attempts x (connect + read)
    plus the backoff between them, fits in `remaining` less the answer's margin (at least one
    attempt of STEP_S + STEP_S when almost nothing is left)."""
    usable = remaining - ANSWER_MARGIN_S
    if usable >= ATTEMPTS * (CONNECT_S + READ_S) + BACKOFF_S:
        return CONNECT_S, READ_S, ATTEMPTS
    attempts = 2 if usable >= 8.0 else 1
    per = (usable - (BACKOFF_S if attempts == 2 else 0.0)) / attempts

    def step(value: float) -> float:
        return max(STEP_S, math.floor(value / STEP_S) * STEP_S)
    connect = min(CONNECT_S, step(per / 4))
    read = min(READ_S, step(per - connect))
    return connect, read, attempts


@functools.cache
def _client(service: str, connect: float = CONNECT_S, read: float = READ_S, attempts: int = ATTEMPTS):
    cfg = Config(retries={"mode": "standard", "total_max_attempts": attempts},
                 connect_timeout=connect, read_timeout=read, max_pool_connections=32)
    # boto3.client is not thread-safe while it builds the client; the reconciler uses threads.
    with _lock:
        import boto3  # on first use: a data plane call that never needs a client never pays for it
        return boto3.session.Session().client(service, region_name=settings().region, config=cfg)


def _unavailable(service: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"{_NAMES.get(service, service)} did not answer in time; nothing was changed by "
                              "this attempt. Retry shortly.", headers={"Retry-After": "1"})


class _Body:
    """An S3 object's body whose stalled reads are the same 503 as a stalled call."""

    def __init__(self, body: StreamingBody, service: str):
        self._body, self._service = body, service

    def _guard(self, read):
        try:
            return read()
        except (BotoConnectionError, HTTPClientError) as exc:
            raise _unavailable(self._service) from exc

    def read(self, amt=None):
        return self._guard(lambda: self._body.read(amt))

    def iter_chunks(self, chunk_size: int = 1024):
        chunks = self._body.iter_chunks(chunk_size)
        while True:
            chunk = self._guard(lambda: next(chunks, None))
            if chunk is None:
                return
            yield chunk

    def iter_lines(self, chunk_size: int = 1024, keepends: bool = False):
        lines = self._body.iter_lines(chunk_size, keepends)
        while True:
            line = self._guard(lambda: next(lines, None))
            if line is None:
                return
            yield line

    def __getattr__(self, name):
        return getattr(self._body, name)


class _Guarded:
    """A client whose calls answer a stalled or unreachable service with ServiceUnavailable;
    every other error (a ClientError: not found, denied, invalid) passes through unchanged."""

    def __init__(self, client, service: str):
        self._client, self._service = client, service

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr) or name in ("get_paginator", "get_waiter", "can_paginate"):
            return attr

        def call(*args, **kwargs):
            try:
                out = attr(*args, **kwargs)
            except (BotoConnectionError, HTTPClientError) as exc:
                raise _unavailable(self._service) from exc
            if isinstance(out, dict) and isinstance(out.get("Body"), StreamingBody):
                out["Body"] = _Body(out["Body"], self._service)
            return out
        return call


def s3():
    return _Guarded(_client("s3", *timeouts(deadline.remaining())), "s3")


def sqs():
    return _Guarded(_client("sqs", *timeouts(deadline.remaining())), "sqs")


def events():
    return _Guarded(_client("events", *timeouts(deadline.remaining())), "events")


def secrets():
    return _Guarded(_client("secretsmanager", *timeouts(deadline.remaining())), "secretsmanager")


def stepfunctions():
    return _Guarded(_client("stepfunctions", *timeouts(deadline.remaining())), "stepfunctions")


def scheduler():
    return _Guarded(_client("scheduler", *timeouts(deadline.remaining())), "scheduler")


def lambda_():
    # Reward Lambdas have their own client and timeouts (adapters/lambdas.py); this one is for
    # short control calls, with the standard timeouts.
    return _client("lambda")
