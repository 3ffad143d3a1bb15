"""`make run` (python -m local.run) stopped at any moment ends every child, and a later run never meets
stale servers on its ports. Real runs in a temporary state directory on free ports."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from local import servers

NAMES = ("api", "dynamodb", "moto", "bedrock", "lambda", "slack", "ddb_faults", "dataplane")


def _ports() -> dict[str, int]:
    return {name: servers.free_port() for name in NAMES}


def _start(state: Path, ports: dict[str, int]) -> subprocess.Popen:
    env = {**os.environ, "RFT_LOCAL_STATE": str(state), "PYTHONUNBUFFERED": "1",
           **{f"LOCAL_PORT_{name.upper()}": str(port) for name, port in ports.items()}}
    return subprocess.Popen([sys.executable, "-m", "local.run"], cwd=servers.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _read_until(proc: subprocess.Popen, marker: str, seen: list[str]) -> str:
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return line
    raise AssertionError(f"run ended before {marker!r}:\n{''.join(seen)}")


def _ours(ports: dict[str, int]) -> list[tuple[int, str]]:
    """Live (not zombie) processes whose command line names one of this run's ports: every server
    run.py starts has its port on its command line."""
    wanted = {str(p) for p in ports.values()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if wanted & set(argv) and servers.alive(int(entry.name)):
            found.append((int(entry.name), " ".join(argv[:6])))
    return found


@pytest.fixture
def cleanup():
    """Whatever a failing test leaves is ended (by pid, the runs' own process groups only)."""
    started: list[dict[str, int]] = []
    yield started
    for ports in started:
        servers.stop_groups([pid for pid, _ in _ours(ports)], timeout=5)


def test_sigint_while_saving_the_bucket_ends_every_child_and_the_next_run_stops_stale_ones(tmp_path, cleanup):
    ports = _ports()
    cleanup.append(ports)
    seen: list[str] = []
    run = _start(tmp_path, ports)
    _read_until(run, "rft-hub is up", seen)
    record = json.loads((tmp_path / "children.json").read_text())
    pids = {entry["args"][2] if entry["args"][0] == sys.executable else "java": entry["pid"] for entry in record}
    assert len(record) == 7 and all(servers.alive(entry["pid"]) for entry in record)
    # The data plane answers on its own port too (measured without the local API Gateway's hop).
    stack = json.loads((tmp_path / "stack.json").read_text())
    assert stack["services"]["dataplane"] == f"http://127.0.0.1:{ports['dataplane']}"
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(stack["services"]["dataplane"] + "/v1/chat/completions", timeout=10)
    assert answer.value.code == 405 and json.loads(answer.value.read())["error"]["type"] == "invalid_request_error"

    # moto paused: the save (after a child's exit stops the run) waits on it, so the signals below
    # arrive while the bucket is being saved, whatever the machine's speed.
    os.kill(pids["moto.server"], signal.SIGSTOP)
    try:
        os.kill(pids["local.slack_sink"], signal.SIGKILL)
        _read_until(run, "saving the datasets bucket", seen)
        os.killpg(run.pid, signal.SIGINT)        # Ctrl-C reaches the foreground group
        os.kill(run.pid, signal.SIGTERM)         # and make passes a SIGTERM on
    finally:
        os.kill(pids["moto.server"], signal.SIGCONT)
    out, _ = run.communicate(timeout=180)
    seen.append(out)
    assert run.returncode == 1, "".join(seen)
    assert not _ours(ports), "".join(seen)
    assert not (tmp_path / "children.json").exists()

    # A run killed without its clean-up leaves its servers: the next run on the same ports stops them
    # (its record names them), and is then stopped at once, mid start-up, ending what it started.
    run = _start(tmp_path, ports)
    _read_until(run, "rft-hub is up", seen)
    stale = [entry["pid"] for entry in json.loads((tmp_path / "children.json").read_text())]
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert all(servers.alive(pid) for pid in stale)
    run = _start(tmp_path, ports)
    line = _read_until(run, "an earlier run left running", seen)
    assert set(json.loads(line.split("pids ")[1])) == set(stale)
    assert not any(servers.alive(pid) for pid in stale)
    _read_until(run, "starting DynamoDB Local", seen)
    os.killpg(run.pid, signal.SIGINT)
    out, _ = run.communicate(timeout=180)
    seen.append(out)
    assert run.returncode == 0, "".join(seen)
    assert not _ours(ports), "".join(seen)


def test_a_port_held_by_something_else_is_refused_clearly(tmp_path):
    ports = _ports()
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", ports["bedrock"]))
        foreign.listen()
        run = _start(tmp_path, ports)
        out, _ = run.communicate(timeout=120)
    assert run.returncode == 1, out
    assert f"bedrock 127.0.0.1:{ports['bedrock']}" in out and "ports in use" in out, out
    assert "starting DynamoDB Local" not in out and not _ours(ports)
