"""Dependency checks for GET /health: each one cheap, bounded, and reported, not raised."""
from __future__ import annotations

import time
from collections.abc import Callable

from chalicelib.adapters import aws
from chalicelib.config import settings
from chalicelib.store.models import Team


def _timed(check: Callable[[], None]) -> dict:
    started = time.perf_counter()
    try:
        check()
        status = {"status": "ok"}
    except Exception as exc:  # noqa: BLE001 - a failing dependency is data here, not an error
        status = {"status": "error", "error": type(exc).__name__}
    status["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return status


def report() -> dict:
    from chalicelib.adapters import bedrock  # late: keeps /health importable without openai warm-up

    checks = {
        "dynamodb": _timed(lambda: Team.describe_table()),
        "s3": _timed(lambda: aws.s3().head_bucket(Bucket=settings().datasets_bucket)),
        "bedrock": _timed(bedrock.ping),
    }
    healthy = all(c["status"] == "ok" for c in checks.values())
    return {"service": "rft-hub", "stage": settings().stage,
            "status": "ok" if healthy else "degraded", "dependencies": checks}
