"""Secrets Manager reads, cached per process (secrets change by redeploy or rotation)."""
from __future__ import annotations

import time

from chalicelib.adapters import aws

_cache: dict[str, tuple[float, str]] = {}
_TTL_SECONDS = 300


def get_secret(secret_id: str) -> str:
    hit = _cache.get(secret_id)
    now = time.monotonic()
    if hit and now - hit[0] < _TTL_SECONDS:
        return hit[1]
    value = aws.secrets().get_secret_value(SecretId=secret_id)["SecretString"]
    _cache[secret_id] = (now, value)
    return value


def clear_cache() -> None:
    _cache.clear()
