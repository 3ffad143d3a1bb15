"""Lazily created boto3 clients.

Endpoints are never configured here: botocore reads AWS_ENDPOINT_URL_<SERVICE>
(set by the local stack and the tests), and uses the real AWS endpoints when unset.
Clients are cached per process so warm Lambda invocations reuse connections.
"""
from __future__ import annotations

import functools
import threading

import boto3
from botocore.config import Config

from chalicelib.config import settings

_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _client(service: str):
    # Two attempts of at most 2 s to connect and 8 s to answer: a stalled S3, SQS or Secrets
    # Manager costs a request at most ~20 s, inside API Gateway's 29 s.
    cfg = Config(retries={"mode": "standard", "total_max_attempts": 2},
                 connect_timeout=2, read_timeout=8, max_pool_connections=32)
    # boto3.client is not thread-safe while it builds the client; the reconciler uses threads.
    with _lock:
        return boto3.session.Session().client(service, region_name=settings().region, config=cfg)


def s3():
    return _client("s3")


def sqs():
    return _client("sqs")


def events():
    return _client("events")


def secrets():
    return _client("secretsmanager")


def lambda_():
    return _client("lambda")
