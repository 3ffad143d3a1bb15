"""Every reward through rft-hub (issue #16): a team's Lambda grader behind the hosted grader scores
exactly as when called directly; rollouts kept in S3 and DynamoDB, browsable and team-isolated;
the preflight's learning-signal probes and base-model sampling."""
import gzip
import json
import random
import re
import time
import uuid

import boto3
import openai
import pytest
from flask import Flask, jsonify, request
from helpers import http, wait_for
from sample_data import arithmetic_rows, jsonl

from chalicelib.adapters import lambdas
from chalicelib.domain.graders import rows as row_fields
from chalicelib.grading import graders
from chalicelib.spend import ledger
from chalicelib.training import hosted_grader
from local import servers
from local.example_graders import arn, exact_match

EQ = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
      "reference": "{{item.reference_answer}}", "operation": "eq"}


def lam(name):
    return {"type": "lambda", "name": "team", "lambda": {"function": arn(name)}}


def rows(n, content=None):
    out = []
    for i in range(n):
        answer = str(i + 1) if i % 3 else str(i)          # every third one wrong
        out.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"{i} + 1?"},
                                                {"role": "assistant", "content": content or answer}],
                    "reference_answer": str(i + 1) if i % 2 else {"text": str(i + 1)}, "extra": {"k": i}})
    return out


@pytest.fixture
def spy(stack):
    """A team Lambda (exact match) that records every event it receives."""
    seen, name = [], f"rft-grader-test-spy-{uuid.uuid4().hex[:8]}"

    def handler(event, context=None):
        seen.append(event)
        delay = next((s.get("extra", {}).get("sleep") for s in event if isinstance(s.get("extra"), dict)
                      and s["extra"].get("sleep")), None)
        if delay:
            time.sleep(delay)
        return exact_match(event)
    stack.lambda_app.config["functions"][name] = handler
    yield name, seen
    stack.lambda_app.config["functions"].pop(name, None)


def wrapped(batch, spec):
    ref = graders.store_spec(spec)
    return hosted_grader.handle([{**r, row_fields.REF_FIELD: ref, row_fields.PROMPT_FIELD: r["id"]} for r in batch])


def test_a_team_lambda_behind_the_wrapper_scores_exactly_as_called_directly(stack, spy):
    name, seen = spy
    batch = rows(30)
    batch.append(json.loads(json.dumps(batch[4])))       # a repeated id (UNCONFIRMED whether Bedrock sends one)
    direct = lambdas.invoke(arn(name), batch)
    calls = len(seen)
    through = wrapped(batch, lam(name))
    assert [(o["id"], o["aggregate_reward_score"], o["metrics_list"]) for o in through] == \
        [(o["id"], float(o["aggregate_reward_score"]), o["metrics_list"]) for o in direct]
    sent = [row for event in seen[calls:] for row in event]
    assert len(seen) - calls == 2                          # the repeated id went to a second invocation
    assert sorted(json.dumps(r, sort_keys=True) for r in sent) == sorted(json.dumps(r, sort_keys=True) for r in batch)
    assert not any(k.startswith("rft_") for r in sent for k in r)     # rft-hub's own fields stay with rft-hub


def test_the_wrapper_splits_under_6_mb_and_scores_violations_and_timeouts_as_errors(stack, spy, monkeypatch):
    name, seen = spy
    big = rows(8, content="x" * 1_500_000)
    before = len(seen)
    out = wrapped(big, lam(name))
    sizes = [len(json.dumps(e).encode()) for e in seen[before:]]
    assert len(sizes) >= 2 and max(sizes) < 6_291_456 and len(out) == 8
    assert all(o["aggregate_reward_score"] == 0.0 and not any(m["name"].startswith("error.") for m in o["metrics_list"])
               for o in out)

    def errors(outputs):
        return [sorted(m["name"] for m in o["metrics_list"] if m["name"].startswith("error.")) for o in outputs]
    broken = wrapped(rows(3), lam("rft-grader-example-broken-contract"))
    assert errors(broken) == [["error.lambda_contract_error"]] * 3 and all(o["aggregate_reward_score"] == 0 for o in broken)
    missing = wrapped(rows(2), lam("rft-grader-example-never-deployed"))
    assert errors(missing) == [["error.lambda_error"]] * 2
    monkeypatch.setattr(lambdas, "LAMBDA_TIMEOUT_S", 1)
    slow = rows(2)
    slow[0]["extra"] = {"sleep": 2.5}
    assert errors(wrapped(slow, lam(name))) == [["error.lambda_timeout"]] * 2


def _me(client):
    return http("GET", f"{str(client.base_url).rstrip('/')}/me", client.api_key)[1]["team"]["id"]


def _get(client, path):
    return http("GET", f"{str(client.base_url).rstrip('/')}{path}", client.api_key)


def _pages(client, path, limit, by="id"):
    """Every item of a paged list, following `after` = the last id (or rft_next_cursor)."""
    items, after = [], None
    for _ in range(50):
        sep = "&" if "?" in path else "?"
        status, page = _get(client, f"{path}{sep}limit={limit}" + (f"&after={after}" if after else ""))
        assert status == 200, page
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["data"][-1][by] if by != "cursor" else page["rft_next_cursor"]
    raise AssertionError("too many pages")


@pytest.fixture
def trained(make_team, stack, bedrock):
    """A job that trained 3 steps with a declarative grader: 3 windows of 8 kept rollouts each."""
    bedrock.clock.update({"total_steps": 3, "samples_per_step": 8})
    _, key = make_team("rollouts")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, extra_body={
        "method": {"type": "reinforcement", "reinforcement": {"grader": EQ}}})
    assert wait_for(client, job.id, {"succeeded", "failed"}, timeout=60).status == "succeeded"
    return client, job


def test_rollouts_are_kept_browsable_and_page_in_every_order(trained):
    client, job = trained
    base = f"/fine_tuning/jobs/{job.id}/rollouts"
    desc = _pages(client, f"{base}?window=1&order=reward_desc", 3)
    assert len(desc) == 8 and len({r["id"] for r in desc}) == 8
    rewards = [r["reward"] for r in desc]
    assert rewards == sorted(rewards, reverse=True)
    assert all(r["response"] is not None and r["prompt"] and r["window"] == 1 for r in desc)
    assert {r["kept"] for r in desc} <= {"top", "bottom", "random"}
    assert [r["id"] for r in _pages(client, f"{base}?window=1&order=reward_desc", 3, by="cursor")] == \
        [r["id"] for r in desc]
    asc = _pages(client, f"{base}?window=1&order=reward_asc", 5)
    assert [r["id"] for r in asc] == [r["id"] for r in reversed(desc)]
    shuffled = _pages(client, f"{base}?window=1&order=random", 2)
    assert sorted(r["id"] for r in shuffled) == sorted(r["id"] for r in desc)
    assert [r["id"] for r in _pages(client, f"{base}?window=1&order=random", 4)] == [r["id"] for r in shuffled]

    status, latest = _get(client, base)                        # default: the newest window, best first
    assert status == 200 and latest["window"] == 3 and latest["order"] == "reward_desc"
    assert _get(client, f"{base}?window=99")[1]["data"] == []
    assert _get(client, f"{base}?window=1&after=no-such-rollout")[1]["data"] == []
    for query, param in (("order=worst", "order"), ("window=0", "window"), ("window=x", "window"),
                         ("limit=1000", "limit")):
        status, body = _get(client, f"{base}?{query}")
        assert status == 400 and body["error"]["param"] == param, (query, body)
    # A cursor belongs to its window and its order.
    status, page = _get(client, f"{base}?window=1&order=reward_desc&limit=2")
    cursor = page["rft_next_cursor"]
    for query in (f"window=2&order=reward_desc&after={cursor}", f"window=1&order=random&after={cursor}"):
        status, body = _get(client, f"{base}?{query}")
        assert status == 400 and body["error"]["param"] == "after", body

    # Every sample of an invocation is in its S3 object, the kept ones with their text.
    team_id = _me(client)
    obj = boto3.client("s3", region_name="us-west-2").get_object(
        Bucket="rfthub-local-datasets", Key=f"rollouts/{team_id}/{job.id}/i0000001.jsonl.gz")
    lines = [json.loads(line) for line in gzip.decompress(obj["Body"].read()).decode().splitlines()]
    assert len(lines) == 8 and all({"reward", "errors", "length", "fingerprint"} <= set(line) for line in lines)
    assert all(line["response"] is not None for line in lines if line["kept"])


def test_the_watch_pages_its_windows_and_both_endpoints_stay_with_their_team(trained, make_team, stack):
    client, job = trained
    path = f"/fine_tuning/jobs/{job.id}/watch"
    windows = _pages(client, path, 2, by="window")
    assert [w["window"] for w in windows] == [1, 2, 3]
    assert [w["window"] for w in _pages(client, path, 1, by="cursor")] == [1, 2, 3]
    status, page = _get(client, f"{path}?limit=2")
    assert status == 200 and page["has_more"] and page["findings"] == [] and page["thresholds"]["min_samples"] == 16
    assert page["watch"] == {"on_critical": "alert", "audit_grader": False, "invocations_per_window": 1,
                             "windowing": "bedrock_steps_where_aligned_else_invocation_count"}
    assert all(w["samples"] == 8 and w["reward_mean"] is not None for w in windows)
    assert _get(client, f"{path}?after=abc")[0] == 400

    _, other_key = make_team("rollouts-other")
    other = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=other_key, max_retries=0)
    for suffix in ("watch", "rollouts", "rollouts?window=1"):
        status, body = _get(other, f"/fine_tuning/jobs/{job.id}/{suffix}")
        assert status == 404, body


# ---- preflight: learning-signal probes and base-model sampling ----------------------------------

def _preflight(client, body):
    return http("POST", f"{str(client.base_url).rstrip('/')}/graders/preflight", client.api_key, body)


def test_preflight_flags_graders_that_pay_for_guessing_and_hedging(client):
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(120))), purpose="fine-tune")
    status, report = _preflight(client, {"grader": {**EQ, "operation": "like"}, "file_id": f.id, "sample_size": 10})
    assert status == 200, report
    codes = {x["code"]: x["severity"] for x in report["findings"]}
    assert codes["rewards_shotgun"] == "critical" and not report["passed"]     # the answer among candidates
    assert codes["rewards_contradiction"] == "warning" and codes["rewards_wrong_field"] == "warning"
    assert report["probes"]["plausible_wrong"] == {**report["probes"]["plausible_wrong"], "count": 10, "mean": 0.0}
    status, strict = _preflight(client, {"grader": EQ, "file_id": f.id, "sample_size": 10})
    assert not {"rewards_shotgun", "rewards_plausible_wrong", "rewards_contradiction", "rewards_wrong_field"} & \
        {x["code"] for x in strict["findings"]}
    blind = {**EQ, "operation": "ne", "reference": "{{item.difficulty}}"}      # pays for anything
    status, report = _preflight(client, {"grader": blind, "file_id": f.id, "sample_size": 10})
    assert {x["code"]: x["severity"] for x in report["findings"]}.get("rewards_plausible_wrong") == "critical"


class ModelPolicy:
    """Replaces a base model's answers on the local Bedrock (POST /_local/models/{model}/policy)."""

    def __init__(self, stack, model, answer):
        app = Flask("model-policy")

        @app.post("/policy")
        def policy():
            body = request.get_json()
            return jsonify({"responses": [[answer(p["messages"])] for p in body["prompts"]]})
        self.server = servers.ThreadServer(app)
        self.control = f"http://127.0.0.1:{stack.bedrock.port}/_local/models/{model}/policy"
        assert http("POST", self.control, body={"url": f"http://127.0.0.1:{self.server.port}/policy"})[0] == 200

    def stop(self):
        http("POST", self.control, body={"url": None})
        self.server.stop()


def _sum(messages):
    a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", messages[-1]["content"]).groups())
    return a + b


def test_preflight_samples_the_base_model_through_the_gateway_within_its_cap(client, stack, bedrock):
    team_id = _me(client)
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(120))), purpose="fine-tune")
    rng = random.Random(4)
    policy = ModelPolicy(stack, "openai.gpt-oss-20b",
                         lambda messages: str(_sum(messages) + (0 if rng.random() < 0.5 else 1)))
    try:
        body = {"grader": EQ, "file_id": f.id, "sample_size": 10,
                "sample_base": {"model": "openai.gpt-oss-20b", "k": 4, "max_usd": "1.00", "prompts": 5}}
        before = len([e for e in ledger.entries(team_id) if e.kind == "inference"])
        status, report = _preflight(client, body)
        assert status == 200, report
        base = report["base"]
        assert base["calls"] == 20 and base["prompts"] == 5 and base["samples"] == 20 and base["call_errors"] == 0
        assert 0 < base["reward_floor"] < 1 and base["headroom"] == pytest.approx(1 - base["reward_floor"], abs=1e-3)
        assert 0 <= base["flat_share"] <= 1 and base["spent_usd"] != "0.000000"
        after = [e for e in ledger.entries(team_id) if e.kind == "inference"]
        assert len(after) - before == 20                    # metered to the team like any call

        capped = _preflight(client, {**body, "sample_base": {**body["sample_base"], "max_usd": "0.000001"}})[1]
        assert capped["base"]["calls"] == 0 and capped["base"]["skipped_for_cap"] == 20

        policy.stop()
        policy = ModelPolicy(stack, "openai.gpt-oss-20b", lambda messages: str(_sum(messages)))   # always right
        solved = _preflight(client, body)[1]
        assert solved["base"]["flat_share"] == 1.0 and solved["base"]["reward_floor"] == 1.0
        codes = {x["code"]: x["severity"] for x in solved["findings"]}
        assert codes == {**codes, "no_learning_signal": "warning", "little_headroom": "warning"}
        status, bad = _preflight(client, {**body, "sample_base": {"k": 1}})
        assert status == 400 and bad["error"]["param"] == "sample_base.k"
        calls = len(ledger.entries(team_id))
        status, bad = _preflight(client, {**body, "sample_base": {"max_usd": "a lot"}})
        assert status == 400 and bad["error"]["param"] == "sample_base.max_usd"
        assert len(ledger.entries(team_id)) == calls   # refused before any call
    finally:
        policy.stop()


def test_a_job_can_sample_the_base_model_in_its_own_preflight(client, stack, bedrock):
    """`sample_base` on job creation: the job worker's preflight samples the base model (metered
    to the team, within the cap) and the report is on the job; bad settings are a 400 before
    anything is recorded or called."""
    from helpers import wait_submitted

    team_id = _me(client)
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(120))), purpose="fine-tune")
    policy = ModelPolicy(stack, "openai.gpt-oss-20b", lambda messages: str(_sum(messages)))    # always right
    method = {"type": "reinforcement", "reinforcement": {"grader": EQ}}
    try:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, extra_body={
                "method": method, "sample_base": {"max_usd": "a lot"}})
        assert err.value.body["param"] == "sample_base.max_usd"
        assert not client.fine_tuning.jobs.list().data
        job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, extra_body={
            "method": method, "sample_base": {"k": 2, "prompts": 3, "max_usd": "0.50"}})
        assert job.model_extra["rft_preflight"] is None           # the worker's: it calls a model
        done = wait_submitted(client, job.id, timeout=60)
        base = done.model_extra["rft_preflight"]["base"]
        assert base["calls"] == 6 and base["samples"] == 6 and base["reward_floor"] == 1.0
        codes = {x["code"] for x in done.model_extra["rft_preflight"]["findings"]}
        assert {"no_learning_signal", "little_headroom"} <= codes       # warnings: the job still trains
        assert done.model_extra["rft_submission"] == "submitted"
        sampled = [e for e in ledger.entries(team_id) if e.kind == "inference"]
        assert len(sampled) == 6 and all(e.cost_micro > 0 for e in sampled)
    finally:
        policy.stop()
