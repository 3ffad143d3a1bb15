"""Shared by the benchmarks that need the local stack (started in-process, as in the tests)."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))


def start_stack(fault_layer: bool = True, **env):
    from local.harness import configure_environment

    configure_environment(POWERTOOLS_LOG_LEVEL="ERROR", **env)
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from local.harness import ADMIN_KEY, Stack
    return Stack(fault_layer=fault_layer), ADMIN_KEY


def new_team(admin_key: str, name: str = "bench") -> tuple[str, str]:
    from chalice.test import Client

    from app import app
    headers = {"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"}
    with Client(app, stage_name="local", project_dir=str(ROOT)) as c:
        team = c.http.post("/v1/admin/teams", headers=headers, body=json.dumps({"name": name})).json_body
        key = c.http.post(f"/v1/admin/teams/{team['id']}/keys", headers=headers).json_body
    return team["id"], key["key"]


def timed(fn, n: int) -> list[float]:
    """Milliseconds of n sequential calls of fn."""
    import time

    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def percentiles(values_ms: list[float]) -> dict:
    ordered = sorted(values_ms)
    q = statistics.quantiles(ordered, n=100)
    return {"p50": round(statistics.median(ordered), 2), "p95": round(q[94], 2), "p99": round(q[98], 2)}
