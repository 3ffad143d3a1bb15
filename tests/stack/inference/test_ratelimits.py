"""Rate limits (issue #29): requests and tokens a minute per team and per key, carved into
per-instance slices of each minute's item (inference/ratelimits.py), OpenAI's headers and 429."""
import json
import time

import openai
import pytest

from chalicelib.errors import RateLimited
from chalicelib.inference import ratelimits

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
