"""The test session's local stack: real servers on loopback, started once.

DynamoDB Local (in-memory), moto in server mode (S3, SQS, EventBridge, Secrets
Manager), the local Bedrock, the local Lambda Invoke API, and rft-hub itself
served over HTTP by Chalice's local server so the openai SDK can talk to it.
The environment is set before the app is imported (table names are read then).
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

os.environ.update({
    "RFT_STAGE": "local", "RFT_TABLE_PREFIX": "rfthub-local-", "RFT_DATASETS_BUCKET": "rfthub-local-datasets",
    "RFT_ADMIN_KEY_SECRET_ID": "rfthub/local/admin-key", "POWERTOOLS_LOG_LEVEL": "WARNING",
    "RFT_HOSTED_GRADER_ARN": "arn:aws:lambda:us-west-2:123456789012:function:rft-hub-local-hosted_grader",
    "RFT_BEDROCK_RETRY_DEADLINE": "3", "RFT_JOB_POLL_MIN_SECONDS": "0",
})

from local import servers  # noqa: E402

ADMIN_KEY = "rfth_admin_" + secrets.token_urlsafe(24)


class Stack:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.procs = []
        self.threads = []
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        ports = {"moto": self.moto.get_host_and_port()[1], "dynamodb": servers.free_port()}
        self.procs.append(servers.start_dynamodb(ports["dynamodb"], None))

        from local import bedrock_server
        self.bedrock_app = bedrock_server.create_app()
        self.bedrock = servers.ThreadServer(self.bedrock_app)
        ports["bedrock"] = self.bedrock.port
        ports["lambda"] = servers.free_port()
        os.environ.update(servers.base_env(ports))
        self.ports = ports

        from local import lambda_server
        self.lambda_app = lambda_server.create_app(lambda_server.app_functions())
        self.threads.append(servers.ThreadServer(self.lambda_app, ports["lambda"]))

        from local.bootstrap import bootstrap
        bootstrap(ADMIN_KEY)
        self.api_port = self._serve_app()
        self.base_url = f"http://127.0.0.1:{self.api_port}"

    def _serve_app(self) -> int:
        from chalice.config import Config
        from chalice.local import LocalDevServer

        from app import app

        import socketserver
        # Chalice's local server listens with the stdlib's backlog of 5; the concurrency tests
        # open 50 connections at once, as API Gateway would.
        socketserver.TCPServer.request_queue_size = 256
        port = servers.free_port()
        config = Config.create(chalice_stage="local", app_name="rft-hub", chalice_app=app, project_dir=str(ROOT),
                               config_from_disk=json.loads((ROOT / ".chalice" / "config.json").read_text()))
        server = LocalDevServer(app, config, host="127.0.0.1", port=port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.wait_for_port(port)
        return port

    @property
    def bedrock_state(self):
        return self.bedrock_app.config["state"]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        self.moto.stop()


@pytest.fixture(scope="session")
def stack():
    s = Stack()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def api(stack):
    """chalice.test.Client: the app in-process, against the local servers over HTTP."""
    from chalice.test import Client

    from app import app
    with Client(app, stage_name="local", project_dir=str(ROOT)) as client:
        yield client


@pytest.fixture
def admin_headers():
    return {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}


@pytest.fixture
def make_team(api, admin_headers):
    """Creates a team and one key; returns (team_id, key)."""
    def make(name: str = "team"):
        team = api.http.post("/v1/admin/teams", headers=admin_headers, body=json.dumps({"name": name})).json_body
        key = api.http.post(f"/v1/admin/teams/{team['id']}/keys", headers=admin_headers).json_body
        return team["id"], key["key"]
    return make


@pytest.fixture
def bedrock(stack):
    """The local Bedrock's state; faults and clock are restored after each test."""
    state = stack.bedrock_state
    clock = dict(state.clock)
    state.clock.update({"validating_seconds": 0.1, "queued_seconds": 0.1, "step_seconds": 0.1, "total_steps": 4})
    yield state
    with state.lock:
        state.faults = []
        state.latency_ms = 0
        state.clock = clock


@pytest.fixture
def client(stack, make_team, bedrock):
    """The official openai SDK pointed at rft-hub with a fresh team's key."""
    import openai

    _, key = make_team("sdk-team")
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
