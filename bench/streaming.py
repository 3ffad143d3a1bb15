"""Streaming (issue #14): time to first token and total time of a streamed answer, and the added
latency of a short plain call, straight to the upstream, through LiteLLM's proxy and through
rft-hub (metering on, the team under a budget), in one run on this machine.

The upstream is the local Bedrock in its own process, streaming like a real endpoint
(`stream_ttft_ms=150, stream_token_ms=25`; plain answers at once). LiteLLM's proxy
(`litellm[proxy]`, pinned below) runs from its own virtual environment, `.local/litellm-venv`,
which this script creates from PyPI the first time (LiteLLM needs openai<3, rft-hub pins 3.x);
`LITELLM_LOCAL_MODEL_COST_MAP=True` keeps it off the network. rft-hub is measured twice: as `make run`
runs it, in its own process (the local API Gateway with the data plane behind it, one base
URL), and its data plane alone in its own process, as Lambda Web Adapter runs it deployed
(`python -m chalicelib.dataplane`): the first pays a loopback hop through the local stand-in for
API Gateway, which AWS replaces, and which LiteLLM, run bare, does not pay either. Both against
DynamoDB Local behind the fault layer (pass-through, counting), the team under a budget: a call is
admitted against the instance's budget slice in memory and its ledger entry written after the
answer, so in steady state the caller waits for no DynamoDB write. That is measured too: the
same short calls with every DynamoDB write held 200 ms (on fresh connections, so a call never
waits for the previous call's booking on its connection): the p50 moves by 200 ms per write a
caller waits for.
Every client is the openai SDK in this process asking for usage in the stream (`include_usage`,
which rft-hub always asks the upstream for), so all three read the same upstream events. Paths
are interleaved call by call, and "added" is taken per round (this path's call minus the direct
call made just before it), then its percentiles: the machine's own noise mostly cancels out.

Targets: added time to first token, rft-hub <= LiteLLM (p50 and p95); added latency of a short
plain call, rft-hub <= 0.5x LiteLLM's; total time of a streamed answer within 5% of direct.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx

from bench.common import ROOT, percentiles, start_stack

LITELLM = "litellm[proxy]==1.101.6"      # the newest release whose requirements resolve here (certifi)
VENV = ROOT / ".local" / "litellm-venv"
MODEL = "openai.gpt-oss-20b"
STREAMED = {"model": MODEL, "max_tokens": 64, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Please count slowly from one to twenty: one two three four "
                                                     "five six seven eight nine ten eleven twelve"}]}
SHORT = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Say hi."}]}
UPSTREAM = {"stream_ttft_ms": 150, "stream_token_ms": 25}
N_STREAMS = 40
N_SHORT = 200


def ensure_litellm() -> Path:
    python = VENV / "bin" / "python"
    stamp = VENV / f".installed-{LITELLM}"
    if not stamp.exists():
        print(f"creating {VENV} with {LITELLM} (once; a few minutes)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", LITELLM],
                       check=True)
        stamp.touch()
    return python


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise TimeoutError(url)


def start_upstream(env: dict) -> tuple[subprocess.Popen, int]:
    from local import servers

    port = servers.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "local.bedrock_server", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    servers.wait_for_port(port, 60, proc)
    _post(f"http://127.0.0.1:{port}/_local/config", UPSTREAM)
    return proc, port


def start_litellm(python: Path, upstream_port: int, workdir: Path) -> tuple[subprocess.Popen, int]:
    from local import servers

    port = servers.free_port()
    config = workdir / "litellm.yaml"
    config.write_text(json.dumps({   # YAML is a superset of JSON
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": f"http://127.0.0.1:{upstream_port}/v1",
            "api_key": "bedrock-api-key-bench"}}],
        "litellm_settings": {"telemetry": False}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENAI_", "RFT_"))}
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "NO_PROXY": "*",
                "LITELLM_LOG": "ERROR"})
    log = open(workdir / "litellm.log", "w")
    proc = subprocess.Popen([str(python.parent / "litellm"), "--config", str(config), "--host", "127.0.0.1",
                             "--port", str(port), "--num_workers", "1"], cwd=workdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _wait_http(f"http://127.0.0.1:{port}/health/liveliness", 180, proc)
    return proc, port


def start_rft_hub(env: dict) -> tuple[subprocess.Popen, int]:
    from local import servers

    port = servers.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "local.api_gateway", "--stage", "local", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    servers.wait_for_port(port, 60, proc)
    return proc, port


def start_dataplane(env: dict) -> tuple[subprocess.Popen, int]:
    """The data plane alone, as Lambda Web Adapter runs it deployed (chalicelib/dataplane/run.sh):
    rft-hub's proxy without the local stand-in for API Gateway in front of it."""
    from local import servers

    port = servers.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chalicelib.dataplane", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait_http(f"http://127.0.0.1:{port}/_dataplane/ready", 60, proc)
    return proc, port


def streamed(client) -> tuple[float, float]:
    """(ms to the first content token, ms to the end of the stream) of one streamed answer."""
    started = time.perf_counter()
    first = None
    text = []
    for chunk in client.chat.completions.create(**STREAMED, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    assert first is not None and "twelve" in "".join(text), text
    return (first - started) * 1000, (end - started) * 1000


def short(client) -> float:
    started = time.perf_counter()
    reply = client.chat.completions.create(**SHORT)
    assert reply.choices[0].message.content
    return (time.perf_counter() - started) * 1000


def waited_writes(stack, clients: dict, n: int = 15, delay_ms: int = 200) -> dict:
    """DynamoDB writes each caller waits for: the p50 of fresh-connection short calls with every
    write held `delay_ms`, minus without, over `delay_ms`."""
    def p50(name):
        return statistics.median(short(clients[name]) for _ in range(n))
    out = {}
    for name in ("rft_hub", "rft_hub_dataplane"):
        p50(name)                                        # warm, and a slice taken
        plain = p50(name)
        stack.ddb_faults.configure(write_delay_ms=delay_ms)
        try:
            held = p50(name)
        finally:
            stack.ddb_faults.reset()
        out[name] = round((held - plain) / delay_ms, 2)
    return out


def run(n_streams: int = N_STREAMS, n_short: int = N_SHORT) -> dict:
    python = ensure_litellm()
    stack, admin_key = start_stack()
    import openai
    from chalice.test import Client

    from app import app
    from bench.common import new_team

    procs = []
    workdir = Path(tempfile.mkdtemp(prefix="rft-bench-streaming-"))
    try:
        upstream, upstream_port = start_upstream(dict(os.environ))
        procs.append(upstream)
        os.environ["AWS_ENDPOINT_URL_BEDROCK_MANTLE"] = f"http://127.0.0.1:{upstream_port}"   # for rft-hub
        litellm, litellm_port = start_litellm(python, upstream_port, workdir)
        procs.append(litellm)
        hub, hub_port = start_rft_hub(dict(os.environ))
        procs.append(hub)
        plane, plane_port = start_dataplane(dict(os.environ))
        procs.append(plane)

        team_id, key = new_team(admin_key, "bench-streaming")
        headers = {"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"}
        with Client(app, stage_name="local", project_dir=str(ROOT)) as c:
            r = c.http.put(f"/v1/admin/teams/{team_id}/budget", headers=headers,
                           body=json.dumps({"limit_usd": "100000", "period": "monthly", "alert_thresholds": []}))
            assert r.status_code == 200, r.body
        clients = {
            "direct": openai.OpenAI(base_url=f"http://127.0.0.1:{upstream_port}/v1", api_key="bedrock-api-key-bench",
                                    max_retries=0),
            "litellm": openai.OpenAI(base_url=f"http://127.0.0.1:{litellm_port}/v1", api_key="sk-bench",
                                     max_retries=0),
            "rft_hub": openai.OpenAI(base_url=f"http://127.0.0.1:{hub_port}/v1", api_key=key, max_retries=0),
            "rft_hub_dataplane": openai.OpenAI(base_url=f"http://127.0.0.1:{plane_port}/v1", api_key=key,
                                               max_retries=0),
        }
        for _ in range(5):                      # warm: connections, caches, imports
            for client in clients.values():
                streamed(client)
                short(client)
        ttft = {name: [] for name in clients}
        total = {name: [] for name in clients}
        plain = {name: [] for name in clients}
        for _ in range(n_streams):
            for name, client in clients.items():
                first, end = streamed(client)
                ttft[name].append(first)
                total[name].append(end)
        writes_before = stack.ddb_faults.counters()["forwarded"]
        for _ in range(n_short):
            for name, client in clients.items():
                plain[name].append(short(client))
        time.sleep(1)                           # the last call's booking, after its answer
        writes_after = stack.ddb_faults.counters()["forwarded"]
        ops = {op: writes_after.get(op, 0) - writes_before.get(op, 0) for op in writes_after}
        fresh = {name: openai.OpenAI(base_url=clients[name].base_url, api_key=key, max_retries=0,
                                     http_client=httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)))
                 for name in ("rft_hub", "rft_hub_dataplane")}
        waited = waited_writes(stack, fresh)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        stack.stop()

    def added(figures: dict, name: str) -> dict:
        paired = percentiles([mine - base for mine, base in zip(figures[name], figures["direct"])])
        return {k: paired[k] for k in ("p50", "p95")}

    p = {kind: {name: percentiles(values) for name, values in figures.items()}
         for kind, figures in (("ttft_ms", ttft), ("stream_total_ms", total), ("short_call_ms", plain))}
    hubs = ("rft_hub", "rft_hub_dataplane")
    added_ttft = {name: added(ttft, name) for name in ("litellm", *hubs)}
    added_short = {name: added(plain, name) for name in ("litellm", *hubs)}
    total_ratio = {name: round(statistics.median(mine / base for mine, base in zip(total[name], total["direct"])), 4)
                   for name in ("litellm", *hubs)}
    targets = {}
    for hub in hubs:
        suffix = "" if hub == "rft_hub" else "_dataplane_alone"
        targets.update({
            f"added_ttft_rft_hub{suffix}_at_most_litellm": all(added_ttft[hub][k] <= added_ttft["litellm"][k]
                                                               for k in ("p50", "p95")),
            f"added_short_call_rft_hub{suffix}_at_most_half_litellm": all(
                added_short[hub][k] <= 0.5 * added_short["litellm"][k] for k in ("p50", "p95")),
            f"stream_total_rft_hub{suffix}_within_5pct_of_direct": total_ratio[hub] <= 1.05,
        })
    return {
        "benchmark": "streaming", "upstream": UPSTREAM, "streams_each": n_streams, "short_calls_each": n_short,
        "litellm": LITELLM, **p,
        "added_ttft_ms": added_ttft, "added_short_call_ms": added_short, "stream_total_vs_direct_median_ratio": total_ratio,
        "dynamodb_operations_per_short_call": {op: round(n / (2 * n_short), 3) for op, n in sorted(ops.items()) if n},
        "dynamodb_operations_per_short_call_all": round(sum(ops.values()) / (2 * n_short), 3),
        "dynamodb_writes_the_caller_waits_for": waited,
        "targets": {**targets, "dynamodb_operations_per_call_at_most_1_2": sum(ops.values()) / (2 * n_short) <= 1.2,
                    "no_dynamodb_write_waited_for": all(w < 0.5 for w in waited.values())},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
