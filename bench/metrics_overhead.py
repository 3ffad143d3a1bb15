"""What the gateway's metrics cost a call (issue #26: at most 0.3 ms p50 with tracing): one
`metrics.gateway_call` per call, as the data plane makes it (outside an invocation: its line is
written at once), against the same loop without it, interleaved in one run; stdout is a pipe to a
reader thread, as Lambda's log capture is. Also the import cost of chalicelib.metrics and
chalicelib.tracing on top of `import app` (fresh interpreters): X-Ray's SDK never loads outside
Lambda, so tracing costs the local data plane nothing; deployed, it is Lambda's own segment plus
the patched botocore calls.

    python -m bench.metrics_overhead
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402  (after the path is set, as a script)

CALLS = 5000
ROUNDS = 5


def overhead() -> dict:
    from chalicelib import metrics

    read, write = os.pipe()
    reader = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(read, 65536), b"")], daemon=True)
    reader.start()
    real = sys.stdout
    sys.stdout = os.fdopen(write, "w", buffering=1)
    try:
        def call():   # what a served call does around it: nothing here, the metric alone is measured
            metrics.gateway_call("team_bench", "openai.gpt-oss-20b", 200, 1.2, 312.5, 48.0, 31, 64, 1234, True)

        def nothing():
            pass

        with_m, without = [], []
        for _ in range(ROUNDS):            # interleaved rounds: the machine's load falls on both sides
            with_m += common.timed(call, CALLS // ROUNDS)
            without += common.timed(nothing, CALLS // ROUNDS)
    finally:
        sys.stdout.close()
        sys.stdout = real
    p50 = statistics.median(with_m) - statistics.median(without)
    p99 = statistics.quantiles(with_m, n=100)[98] - statistics.quantiles(without, n=100)[98]
    return {"gateway_call_p50_ms": round(p50, 4), "gateway_call_p99_ms": round(p99, 4), "target_p50_ms": 0.3}


def import_cost(runs: int = 7) -> dict:
    """Median seconds of `import app` and of importing chalicelib.metrics + tracing after it."""
    from local.servers import local_stage_env

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT_URL", "RFT_"))}
    env.update({**local_stage_env(), "AWS_DEFAULT_REGION": "us-west-2"})
    code = ("import time, json, sys; t = time.perf_counter(); import app; a = time.perf_counter() - t; "
            "print(json.dumps({'app': a, 'xray': 'aws_xray_sdk' in sys.modules}))")
    apps, xray = [], set()
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout
        got = json.loads(out.strip().splitlines()[-1])
        apps.append(got["app"])
        xray.add(got["xray"])
    return {"import_app_s": round(statistics.median(apps), 3), "xray_sdk_loaded_locally": any(xray)}


if __name__ == "__main__":
    print(json.dumps({"benchmark": "metrics_overhead", **overhead(), **import_cost()}))
