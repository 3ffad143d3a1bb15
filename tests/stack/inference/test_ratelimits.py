"""Rate limits (issue #29): requests and tokens a minute per team and per key, carved into
per-instance slices of each minute's item (inference/ratelimits.py), OpenAI's headers and 429."""
import json
import random
import time

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.errors import RateLimited
from chalicelib.inference import concurrency, ratelimits

MODEL = "openai.gpt-oss-20b"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


def limit(api, admin_headers, team_id, **body):
    r = api.http.put(f"/v1/admin/teams/{team_id}/limits", headers=admin_headers, body=json.dumps(body))
    assert r.status_code == 200, r.json_body
    ratelimits._config.invalidate(team_id)
    return r.json_body


def clock_at(second: float):
    """A clock fixed inside one minute (the windows are whole minutes)."""
    base = (int(time.time()) // 60 + 1000) * 60
    return lambda: base + second


def test_120_requests_from_three_instances_never_pass_100_a_minute(api, admin_headers, make_team):
    team_id, _ = make_team("rpm")
    other_id, _ = make_team("rpm-other")
    limit(api, admin_headers, team_id, requests_per_minute=100)
    limit(api, admin_headers, other_id, requests_per_minute=100)
    now = clock_at(5)
    instances = [ratelimits.Limiter(clock=now) for _ in range(3)]
    admitted, remaining = 0, []
    for i in range(120):
        try:
            ticket = instances[i % 3].admit(team_id, None, 10)
            admitted += 1
            if i % 3 == 0:
                remaining.append(int(ticket.headers["x-ratelimit-remaining-requests"]))
        except RateLimited as err:
            assert err.code == "rate_limit_exceeded" and int(err.headers["Retry-After"]) == 55
            assert err.headers["x-ratelimit-limit-requests"] == "100"
    assert admitted <= 100                          # the burst within a minute: none
    assert admitted >= 100 - 3 * 25                 # slices unused by an instance are the only loss
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] < remaining[0]   # counts down
    assert instances[0].admit(other_id, None, 10).headers["x-ratelimit-remaining-requests"]   # unaffected
    later = ratelimits.Limiter(clock=lambda: now() + 60)                                 # the next minute
    assert later.admit(team_id, None, 10).headers["x-ratelimit-limit-requests"] == "100"


def test_a_key_limit_and_a_token_limit_apply_on_top_of_the_team(api, admin_headers, make_team):
    team_id, _ = make_team("tpm")
    key = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers).json_body
    limit(api, admin_headers, team_id, tokens_per_minute=1000)
    limit(api, admin_headers, team_id, key_id=key["id"], requests_per_minute=2)
    lim = ratelimits.Limiter(clock=clock_at(10))
    lim.admit(team_id, key["id"], 300).finish(100)          # 200 tokens given back after the call
    lim.admit(team_id, key["id"], 300)
    with pytest.raises(RateLimited) as err:
        lim.admit(team_id, key["id"], 10)                   # the key's 2 requests
    assert err.value.headers["x-ratelimit-limit-requests"] == "2"
    lim.admit(team_id, None, 500)                           # the team: 100 + 300 + 500 <= 1,000
    with pytest.raises(RateLimited):
        lim.admit(team_id, None, 200)
    r = api.http.put(f"/v1/admin/teams/{team_id}/limits", headers=admin_headers,
                     body=json.dumps({"requests_per_minute": 0}))
    assert r.status_code == 400 and r.json_body["error"]["param"] == "requests_per_minute"
    r = api.http.put(f"/v1/admin/teams/{team_id}/limits", headers=admin_headers,
                     body=json.dumps({"requests_per_minute": 5, "key_id": "key_not_this_teams"}))
    assert r.status_code == 404 and r.json_body["error"]["param"] == "key_id"


def test_a_sixth_call_in_a_minute_against_5_rpm_is_a_429_with_retry_after(api, admin_headers, make_team, stack):
    team_id, key = make_team("five")
    limit(api, admin_headers, team_id, requests_per_minute=5)
    if time.time() % 60 > 50:                               # the six calls inside one minute
        time.sleep(61 - time.time() % 60)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    seen = []
    for _ in range(5):
        reply = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        seen.append(int(reply.headers["x-ratelimit-remaining-requests"]))
        assert reply.headers["x-ratelimit-limit-requests"] == "5" and reply.headers["x-ratelimit-reset-requests"]
    assert seen == sorted(seen, reverse=True) and seen[-1] == 0
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert err.value.code == "rate_limit_exceeded"
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    assert err.value.response.headers["x-should-retry"] == "true"        # the SDK retries it (after Retry-After)


def test_a_models_limit_counts_only_the_calls_naming_it(api, admin_headers, make_team):
    team_id, _ = make_team("per-model")
    limit(api, admin_headers, team_id, model="openai.gpt-oss-120b", requests_per_minute=2)
    lim = ratelimits.Limiter(clock=clock_at(20))
    for _ in range(2):
        lim.admit(team_id, None, 10, "openai.gpt-oss-120b")
    with pytest.raises(RateLimited) as err:
        lim.admit(team_id, None, 10, "openai.gpt-oss-120b")
    assert "openai.gpt-oss-120b" in err.value.message
    for _ in range(5):
        lim.admit(team_id, None, 10, MODEL)                 # another model: the team has no limit of its own
    r = api.http.put(f"/v1/admin/teams/{team_id}/limits", headers=admin_headers,
                     body=json.dumps({"requests_per_minute": 5, "model": "m", "key_id": "k"}))
    assert r.status_code == 400 and r.json_body["error"]["param"] == "model"


# ---- concurrent requests (inference/concurrency.py) ---------------------------------------------------

def _pool(team_id, scope="team"):
    from chalicelib.store.models import RateWindow
    return RateWindow.get(concurrency.pool_key(team_id, scope), consistent_read=True)


def test_concurrent_calls_from_three_instances_never_pass_the_limit_and_free_units_come_back(
        api, admin_headers, make_team):
    team_id, _ = make_team("concurrent")
    limit(api, admin_headers, team_id, concurrent_requests=10)
    assert api.http.get(f"/v1/admin/teams/{team_id}/limits", headers=admin_headers).json_body["data"][0][
        "concurrent_requests"] == 10
    limits = ratelimits.concurrency_limits_for(team_id, None)
    instances = [concurrency.ConcurrencyLimiter() for _ in range(3)]
    parked = 3 * concurrency.spare(10)               # the documented early refusal: idle spares
    rng = random.Random(29)
    in_flight: list = []
    admitted = refused = 0
    for step in range(300):                          # calls start and end in an arbitrary order
        if in_flight and rng.random() < 0.4:
            in_flight.pop(rng.randrange(len(in_flight))).release()
            continue
        try:
            in_flight.append(instances[step % 3].acquire(limits))
            admitted += 1
        except RateLimited as err:
            refused += 1
            assert err.code == "rate_limit_exceeded" and err.headers["Retry-After"] == "1"
            assert len(in_flight) >= 10 - parked     # refused only near the limit
        assert len(in_flight) <= 10                  # never more at once, whatever the instance
        assert _pool(team_id).requests <= 10
    assert admitted > 10 and refused > 0             # the limit was reached, and calls went on after
    while in_flight:
        in_flight.pop().release()
    # N + k at once: N admitted at most, the rest refused; after they end, new calls are admitted.
    burst = []
    for i in range(15):
        try:
            burst.append(instances[i % 3].acquire(limits))
        except RateLimited:
            pass
    assert 10 - parked <= len(burst) <= 10
    for held in burst:
        held.release()
    assert all(inst.acquire(limits) for inst in instances)


def test_a_crashed_instances_units_come_back_when_its_lease_ends(api, admin_headers, make_team):
    team_id, key = make_team("concurrent-crash")
    key_id = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers).json_body["id"]
    limit(api, admin_headers, team_id, key_id=key_id, concurrent_requests=3)
    limits = ratelimits.concurrency_limits_for(team_id, key_id)
    assert limits == [(team_id, f"key:{key_id}", 3)]
    start = time.time()
    crashed = concurrency.ConcurrencyLimiter(clock=lambda: start)
    for _ in range(3):
        crashed.acquire(limits)                      # never released: the instance is gone
    with pytest.raises(RateLimited) as err:
        concurrency.ConcurrencyLimiter(clock=lambda: start + 10).acquire(limits)
    assert "this key" in err.value.message
    assert ratelimits.concurrency_limits_for(team_id, None) == []     # the team's own calls: no limit
    later = concurrency.ConcurrencyLimiter(clock=lambda: start + concurrency.LEASE_SECONDS + 1)
    for _ in range(3):
        later.acquire(limits)                        # the expired lease reclaimed in the carve's write
    assert _pool(team_id, f"key:{key_id}").requests == 3


@pytest.fixture
def held_model(stack):
    """The model's answers wait until the test lets them go; `arrived` counts the calls waiting."""
    import threading

    from flask import Flask, jsonify, request
    from helpers import http

    from local import servers

    gate, arrived = threading.Event(), threading.Semaphore(0)
    app = Flask("held-model-policy")

    @app.post("/policy")
    def policy():
        arrived.release()
        gate.wait(30)
        return jsonify({"responses": [["held answer" for _ in request.get_json()["prompts"]]]})
    server = servers.ThreadServer(app)
    control = f"http://127.0.0.1:{stack.bedrock.port}/_local/models/{MODEL}/policy"
    assert http("POST", control, body={"url": f"http://127.0.0.1:{server.port}/policy"})[0] == 200
    yield gate, arrived
    gate.set()
    http("POST", control, body={"url": None})
    server.stop()


def test_streams_over_the_concurrency_limit_are_429_until_one_ends(api, admin_headers, make_team, stack, held_model):
    import threading

    gate, arrived = held_model
    team_id, key = make_team("concurrent-streams")
    limit(api, admin_headers, team_id, concurrent_requests=2)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    texts: list[str] = []

    def stream():
        got = "".join(c.delta.content or "" for chunk in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=20, stream=True) for c in chunk.choices)
        texts.append(got)
    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(2):
        assert arrived.acquire(timeout=60)           # both streams admitted and waiting on the model
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, stream=True)
        assert err.value.code == "rate_limit_exceeded"
        assert err.value.response.headers["retry-after"] == "1"
    gate.set()
    for t in threads:
        t.join(60)
    assert texts == ["held answer", "held answer"]
    # They ended: their units are free again. The SDK stops reading at `[DONE]`, a moment before the
    # server has booked the stream and given its unit back, so a call made at once may still meet the
    # 429; the SDK retries it after Retry-After, as it would for OpenAI's own.
    patient = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=5)
    for _ in range(3):
        assert "held answer" in patient.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                                max_tokens=20).choices[0].message.content


def test_a_stream_holds_its_unit_until_its_last_event(api, admin_headers, make_team, stack):
    import uuid

    from chalicelib import deadline
    from chalicelib.inference import gateway
    from chalicelib.platform.teams import Principal

    team_id, _ = make_team("concurrent-one-stream")
    limit(api, admin_headers, team_id, concurrent_requests=1)
    who = Principal(team_id, None)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "stream": True}

    def call(**changes):
        return gateway.chat_completions(who, str(uuid.uuid4()), {**body, **changes})
    with deadline.running(60):
        opened = call()                              # the upstream's 200 in hand, nothing relayed yet
        with pytest.raises(RateLimited):
            call(stream=False)
        events = iter(opened)
        assert next(events)                          # relaying: still held
        with pytest.raises(RateLimited):
            call()
        rest = list(events)                          # its end: metered, and the unit given back
        assert rest and opened.entry is not None
        assert call(stream=False).status == 200
        assert call(stream=False).status == 200      # a plain call gives its unit back when answered


@pytest.fixture(scope="module")
def concurrency_team(api):
    from local.harness import ADMIN_KEY

    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    team = api.http.post("/v1/admin/teams", headers=admin, body=json.dumps({"name": "concurrency-props"}))
    limit(api, admin, team.json_body["id"], concurrent_requests=9)
    return team.json_body["id"]


_examples = iter(range(1, 10 ** 6))


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3).map(bool), st.integers(0, 20)),   # 3 starts to 1 end
                min_size=1, max_size=40))
def test_any_order_of_starts_and_ends_on_three_instances_stays_within_the_limit(concurrency_team, ops):
    """Each example plays three new instances a lease later than the last one's (whose leases, never
    given back, are reclaimed as a crashed instance's would be)."""
    at = time.time() + next(_examples) * (concurrency.LEASE_SECONDS + 1)
    instances = [concurrency.ConcurrencyLimiter(clock=lambda: at) for _ in range(3)]
    limits = ratelimits.concurrency_limits_for(concurrency_team, None)
    parked = 3 * concurrency.spare(9)
    in_flight: list = []
    for instance, start, pick in ops:
        if not start and in_flight:
            in_flight.pop(pick % len(in_flight)).release()
            continue
        try:
            in_flight.append(instances[instance].acquire(limits))
        except RateLimited:
            assert len(in_flight) >= 9 - parked          # refused only near the limit
        assert len(in_flight) <= 9 and _pool(concurrency_team).requests <= 9


def test_n_plus_k_streams_on_three_instances_against_n(api, admin_headers, make_team, stack, monkeypatch):
    """Streams opened through the gateway, each on one of three simulated instances (the process's
    limiter swapped for another real one per call): N open at once, the k more refused, and once the
    N have ended, new streams are admitted on every instance."""
    import uuid

    from chalicelib import deadline
    from chalicelib.inference import gateway
    from chalicelib.platform.teams import Principal

    team_id, _ = make_team("concurrent-n-plus-k")
    limit(api, admin_headers, team_id, concurrent_requests=3)
    who = Principal(team_id, None)
    instances = [concurrency.ConcurrencyLimiter() for _ in range(3)]

    def stream_on(i):
        monkeypatch.setattr(concurrency, "_limiter", instances[i % 3])
        return gateway.chat_completions(who, str(uuid.uuid4()), {"model": MODEL, "messages": MESSAGES,
                                                                  "max_tokens": 20, "stream": True})
    opened, refused = [], 0
    with deadline.running(120):
        for i in range(5):
            try:
                opened.append(stream_on(i))
            except RateLimited as err:
                refused += 1
                assert err.code == "rate_limit_exceeded" and err.headers["Retry-After"] == "1"
        assert (len(opened), refused) == (3, 2)
        assert _pool(team_id).requests <= 3
        for s in opened:
            assert s.read_all() and s.entry is not None     # relayed to its end, booked, its unit given back
        again = [stream_on(i) for i in range(3)]
        for s in again:
            s.read_all()
