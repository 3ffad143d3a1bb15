"""Deadlines on every path (issue #23 L9, L11): a stalled S3 or Bedrock is a 503/504 with
`x-should-retry` inside the request's remaining time. Proved by the timeouts the calls were
given (and the attempts a stalled server saw), not by the clock."""
import json
import socket
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_data import arithmetic_rows, jsonl
from test_evals import ITEM_SCHEMA, TUNED, _completions, _team_id
from test_streaming import upstream  # noqa: F401 - the fixture

from chalicelib import deadline
from chalicelib.adapters import aws
from chalicelib.domain import evals as rules
from chalicelib.errors import ServiceUnavailable
from chalicelib.evaluation import evals


class Stalled:
    """A server that accepts connections and never answers (a SIGSTOPped S3): counts them."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections, self.held, self.stop = 0, [], threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.held.append(conn)                   # read nothing, answer nothing

    def close(self):
        self.stop.set()
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def stalled_s3(monkeypatch):
    server = Stalled()

    def start():
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
        aws._client.cache_clear()                   # clients read the endpoint when they are made
    server.start = start
    yield server
    monkeypatch.undo()
    aws._client.cache_clear()
    server.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(remaining=st.floats(min_value=0.0, max_value=900.0))
def test_every_client_wait_fits_the_time_left(stack, remaining):
    connect, read, attempts = aws.timeouts(remaining)
    worst = attempts * (connect + read) + (aws.BACKOFF_S if attempts > 1 else 0)
    assert worst <= max(remaining - aws.ANSWER_MARGIN_S, 2 * aws.STEP_S)
    assert (connect, read, attempts) == (aws.CONNECT_S, aws.READ_S, aws.ATTEMPTS) or remaining < 22
    with deadline.running(remaining):
        cfg = aws.s3()._client.meta.config               # the client a call made now would use
    given_ = cfg.retries["total_max_attempts"] * (cfg.connect_timeout + cfg.read_timeout)
    assert given_ <= max(remaining - aws.ANSWER_MARGIN_S, 2 * aws.STEP_S)


def _eval_and_file(client):
    ev = client.evals.create(name="s3-stall", data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                             testing_criteria=[TUNED])
    f = client.files.create(file=("eval.jsonl", jsonl(arithmetic_rows(3))), purpose="fine-tune")
    return ev, f


def test_a_stalled_s3_is_a_503_within_the_time_left(client, stack, bedrock, stalled_s3):
    ev, f = _eval_and_file(client)
    stalled_s3.start()                              # S3 stops answering after the upload
    body = rules.CreateRun(data_source=_completions("openai.gpt-oss-20b", f.id))
    # 4 s left: one attempt whose connect and read fit in them, then the 503.
    with deadline.running(4.0):
        connect, read, attempts = aws.timeouts(deadline.remaining())
        with pytest.raises(ServiceUnavailable) as err:
            evals.create_run(_team_id(client), ev.id, body, None)
    assert attempts == 1 and connect + read <= 3.0 and stalled_s3.connections == 1
    assert err.value.headers["x-should-retry"] == "true" and "Amazon S3" in err.value.message

    # Through the API (27.5 s left): two attempts of the standard timeouts, then the same 503.
    before = stalled_s3.connections
    reply = httpx.post(f"{stack.base_url}/v1/evals/{ev.id}/runs", timeout=60,
                       headers={"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"},
                       content=json.dumps({"data_source": _completions("openai.gpt-oss-20b", f.id)}))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "service_unavailable", reply.text
    assert reply.headers["x-should-retry"] == "true"
    assert stalled_s3.connections - before == aws.ATTEMPTS
    assert aws.ATTEMPTS * (aws.CONNECT_S + aws.READ_S) + aws.BACKOFF_S <= 29.0 - deadline.MARGIN_SECONDS


def test_a_stalled_bedrock_stream_is_a_504_within_the_upstream_deadline(client, stack, bedrock):
    """Opening a stream waits for Bedrock's first answer only as long as the upstream's retry
    deadline (RFT_BEDROCK_RETRY_DEADLINE: 3 s in tests), not STREAM_IDLE_SECONDS (60 s): a
    Bedrock that answers after 8 s -- it would be served if the first byte could wait 60 s -- is
    a 504 with x-should-retry, and the hold is released."""
    from helpers import http

    from chalicelib.domain import budget as budget_rules
    from chalicelib.inference import upstream as gateway
    from chalicelib.spend import budgets, slices
    from local.harness import ADMIN_KEY

    assert gateway.upstream_deadline() < 8.0 < gateway.STREAM_IDLE_SECONDS
    team_id = client.get("/me", cast_to=object)["team"]["id"]
    status, body = http("PUT", f"{client.base_url}admin/teams/{team_id}/budget", ADMIN_KEY,
                        {"limit_usd": "100", "alert_thresholds": []})
    assert status == 200, body
    bedrock.latency_ms = 8000
    reply = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"},
                       content=json.dumps({"model": "openai.gpt-oss-20b", "stream": True, "max_tokens": 8,
                                           "messages": [{"role": "user", "content": "hello"}]}))
    bedrock.latency_ms = 0
    assert reply.status_code == 504 and reply.headers["x-should-retry"] == "true", reply.text
    assert reply.json()["error"]["code"] == "upstream_timeout"
    slices.lender().give_back_all()                       # the instance goes idle: nothing was spent
    item = budgets.period_item(team_id, budget_rules.period_of(__import__("time").time()))
    assert not budgets.open_holds(item) and item.spent == 0


def test_after_the_first_answer_a_stream_waits_the_idle_limit_not_the_first_byte_limit(client, stack, bedrock,
                                                                                         upstream):  # noqa: F811 - the fixture
    """The first byte's short wait does not carry over to the events: an upstream that pauses
    longer than the first-answer limit after its first event still finishes the stream."""
    import time

    from helpers import http
    from test_streaming import first_within

    from chalicelib.inference import upstream as gateway

    upstream(stream_hold=True)
    stream = client.chat.completions.create(model="openai.gpt-oss-20b", stream=True,
                                            messages=[{"role": "user", "content": "tell me about rivers"}])
    assert first_within(iter(stream)).choices[0].delta.role == "assistant"
    time.sleep(gateway.upstream_deadline() + 1.0)        # paused past the first answer's limit (not timed)
    http("POST", f"http://127.0.0.1:{stack.ports['bedrock']}/_local/stream/release", None, {})
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "stop"
