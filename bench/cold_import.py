"""Cold import: `import app` against a bare Chalice + boto3 app, in fresh interpreters.

A Lambda cold start pays for every module the handler's import graph loads, so the app must
import within 1.5x of the bare baseline (issue #12): the openai SDK and the grader libraries
are imported where they are used. Each run is a new subprocess with the `local` stage's
settings (table names are read at import); the two are interleaved and the medians compared.

Two conditions, the same for both sides:
  bytecode  - every module's bytecode cached (a private PYTHONPYCACHEPREFIX filled by a first
              run): what the import graph costs to execute. The target applies here.
  source    - nothing cached (an empty PYTHONPYCACHEPREFIX, never written): every module compiled
              from source, as the app and its libraries are on Lambda, since `chalice package`'s
              zip holds no .pyc (the standard library is compiled here too, which Lambda's runtime
              has cached: an upper bound)

Also lists the heavy libraries `import app` loaded (none is the goal) and the largest
third-party packages by cumulative import time (`-X importtime`).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = 9
TARGET_RATIO = 1.5
HEAVY = ("openai", "rapidfuzz", "nltk", "rouge_score", "numpy", "simpleeval", "slack_sdk", "httpx2")
BARE_APP = '''from chalice import Chalice
import boto3

app = Chalice(app_name="bare")
_session = boto3.session.Session()


@app.route("/")
def index():
    return {"hello": "world"}
'''
# The data plane's function (issue #28) against the same baseline on Starlette: the app a
# function serving HTTP with Starlette and calling AWS imports before its own code. Also shown
# against Starlette alone.
BARE_STARLETTE = '''from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
import boto3

_session = boto3.session.Session()


async def index(request):
    return PlainTextResponse("hello")

app = Starlette(routes=[Route("/", index)])
'''
BARE_STARLETTE_ONLY = BARE_STARLETTE.replace("import boto3\n\n_session = boto3.session.Session()\n", "")
TIMED = ("import sys, time, json; t = time.perf_counter(); import {module}; "
         "print(json.dumps({{'seconds': time.perf_counter() - t, 'modules': sorted(sys.modules)}}))")


def _env(pycache: str, write: bool) -> dict[str, str]:
    from local.servers import local_stage_env

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_ENDPOINT_URL", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE"))}
    env.update(local_stage_env())
    env.update({"AWS_DEFAULT_REGION": "us-west-2", "POWERTOOLS_LOG_LEVEL": "ERROR", "PYTHONPYCACHEPREFIX": pycache})
    if not write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _once(cwd: Path, env: dict[str, str], module: str = "app") -> dict:
    out = subprocess.run([sys.executable, "-c", TIMED.format(module=module)], cwd=cwd, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(bare_dir: Path, pycache: Path, cache_bytecode: bool, runs: int, module: str = "app"):
    pycache.mkdir(exist_ok=True)
    _once(bare_dir, _env(str(pycache), cache_bytecode))      # fills the bytecode cache (or only the
    _once(ROOT, _env(str(pycache), cache_bytecode), module)  # page cache when not caching bytecode)
    env = _env(str(pycache), write=False)
    bare, app = [], []
    modules: list[str] = []
    for _ in range(runs):
        bare.append(_once(bare_dir, env)["seconds"])
        result = _once(ROOT, env, module)
        app.append(result["seconds"])
        modules = result["modules"]
    return bare, app, modules


def _top_packages(env: dict[str, str], limit: int = 8) -> list[dict]:
    """Third-party packages by the largest cumulative import time of any of their modules."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import app"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    totals: dict[str, int] = {}
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        top = name.strip().split(".")[0]
        if top in ("app", "chalicelib"):
            continue
        totals[top] = max(totals.get(top, 0), int(cumulative))
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:limit]
    return [{"package": name, "cumulative_ms": round(us / 1000, 1)} for name, us in ranked]


def _summary(bare: list[float], app: list[float]) -> dict:
    b, a = statistics.median(bare), statistics.median(app)
    return {"bare_chalice_boto3_s": round(b, 3), "import_app_s": round(a, 3), "ratio": round(a / b, 2),
            "bare_range_s": [round(min(bare), 3), round(max(bare), 3)],
            "app_range_s": [round(min(app), 3), round(max(app), 3)]}


def run(runs: int = RUNS) -> dict:
    result: dict = {"benchmark": "cold_import", "runs_each": runs, "target_ratio": TARGET_RATIO}
    with tempfile.TemporaryDirectory() as tmp:
        bare_dir = Path(tmp) / "bare"
        bare_dir.mkdir()
        (bare_dir / "app.py").write_text(BARE_APP)
        bare, app, modules = _measure(bare_dir, Path(tmp) / "bytecode", True, runs)
        result["bytecode"] = _summary(bare, app)
        result["largest_packages"] = _top_packages(_env(str(Path(tmp) / "bytecode"), write=False))
        bare, app, _ = _measure(bare_dir, Path(tmp) / "empty", False, runs)
        result["source"] = _summary(bare, app)
    result["heavy_libraries_loaded"] = sorted({m.split(".")[0] for m in modules} & set(HEAVY))
    result["dataplane"] = _dataplane(runs)
    b, s = result["bytecode"], result["source"]
    print(f"cold import: app {b['import_app_s']} s vs bare Chalice + boto3 {b['bare_chalice_boto3_s']} s: "
          f"ratio {b['ratio']}x (target <= {TARGET_RATIO}x); from source as on Lambda: "
          f"{s['import_app_s']} s vs {s['bare_chalice_boto3_s']} s, {s['ratio']}x", file=sys.stderr)
    return result


def _dataplane(runs: int) -> dict:
    """`import chalicelib.dataplane.app` (what the data plane's function imports) against a bare
    Starlette + boto3 app, and against Starlette alone, bytecode cached; target 1.5x the first."""
    out: dict = {"target_ratio": TARGET_RATIO}
    with tempfile.TemporaryDirectory() as tmp:
        for label, source in (("starlette_boto3", BARE_STARLETTE), ("starlette_only", BARE_STARLETTE_ONLY)):
            bare_dir = Path(tmp) / label
            bare_dir.mkdir()
            (bare_dir / "app.py").write_text(source)
            bare, plane, modules = _measure(bare_dir, Path(tmp) / "bytecode", True, runs, "chalicelib.dataplane.app")
            b, a = statistics.median(bare), statistics.median(plane)
            out[label] = {"bare_s": round(b, 3), "dataplane_s": round(a, 3), "ratio": round(a / b, 2)}
    out["libraries_not_loaded"] = sorted({"boto3", "pydantic", "openai", "s3transfer"} - {m.split(".")[0]
                                                                                        for m in modules})
    out["target_met"] = out["starlette_boto3"]["ratio"] <= TARGET_RATIO
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
