"""The test session's local stack: real servers on loopback, started once.

DynamoDB Local (in-memory), moto in server mode (S3, SQS, EventBridge, Secrets
Manager), the local Bedrock, the local Lambda Invoke API, and rft-hub itself
served over HTTP by Chalice's local server so the openai SDK can talk to it.
The environment is set before the app is imported (table names are read then).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from local.harness import ADMIN_KEY, Stack, configure_environment  # noqa: E402 - after ROOT is on sys.path

configure_environment(POWERTOOLS_LOG_LEVEL="WARNING", RFT_BEDROCK_RETRY_DEADLINE="3", RFT_JOB_POLL_MIN_SECONDS="0")


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
def ddb_faults(stack):
    """The DynamoDB fault layer every DynamoDB call goes through; back to pass-through after each test."""
    proxy = stack.ddb_faults
    proxy.reset()
    yield proxy
    proxy.reset()


@pytest.fixture
def client(stack, make_team, bedrock):
    """The official openai SDK pointed at rft-hub with a fresh team's key."""
    import openai

    _, key = make_team("sdk-team")
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


class _Unhandled(logging.Handler):
    """Collects the route wrapper's "unhandled error" records: the promise is never a 500."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.records = []

    def emit(self, record):
        if str(record.msg).startswith("unhandled"):
            self.records.append(record)


@pytest.fixture(autouse=True)
def no_500(request):
    """Fails any test during which rft-hub answered a 500 (unless the test is about 500s)."""
    handler = _Unhandled()
    target = logging.getLogger("rft-hub")     # powertools' Logger(service="rft-hub") logs through it
    target.addHandler(handler)
    yield
    target.removeHandler(handler)
    if handler.records and not request.node.get_closest_marker("expects_500"):
        first = handler.records[0]
        pytest.fail(f"rft-hub answered a 500 during this test: {first.getMessage()} "
                    f"({getattr(first, 'path', '')}) {first.exc_text or ''}"[:2000])
