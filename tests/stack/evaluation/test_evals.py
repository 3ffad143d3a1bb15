"""Evals before promotion (issue #17): OpenAI's Evals API through the unmodified SDK, runs on base,
tuned, checkpoint and alias models in the eval worker (metered, budgeted, resumable), the comparison
view, promotion gates on aliases, and the eval a fine-tuning job names.

The local Bedrock answers chat completions deterministically: "[<model>] " and the end of the prompt
(local/bedrock_model.py `_generate`), so a string_check on the model's name tells a tuned model
(":ft:") or a checkpoint ("ckpt-step-4") from the others, and its stand-in judge scores a
"Reference: / Answer:" prompt by text similarity.
"""
import json
import re
import time

import boto3
import openai
import openai_spec
import pytest
from helpers import http, register_graders, rft, start_job, wait_for, wait_run
from sample_data import arithmetic_rows, jsonl

from chalicelib import deadline, outbox
from chalicelib.evaluation import evals
from chalicelib.evaluation import worker as eval_worker
from chalicelib.spend import budgets, ledger
from chalicelib.store.models import EvalOutputItem, EvalRunRecord
from local import servers
from local.harness import ADMIN_KEY

ITEM_SCHEMA = {"type": "object", "required": ["messages", "reference_answer"],
               "properties": {"messages": {"type": "array"}, "reference_answer": {"type": "string"},
                              "id": {"type": "string"}}}
TUNED = {"type": "string_check", "name": "tuned", "input": "{{sample.output_text}}", "reference": ":ft:",
         "operation": "like"}
JUDGE = {"type": "score_model", "name": "judge", "model": "openai.gpt-oss-120b", "range": [0, 1],
         "pass_threshold": 0.01, "sampling_params": {"max_completions_tokens": 32},
         "input": [{"role": "user", "content": "Reference: {{item.reference_answer}}\nAnswer: {{sample.output_text}}"}]}
CORRECT = {"type": "string_check", "name": "correct", "input": "{{sample.output_text}}",
           "reference": "{{item.reference_answer}}", "operation": "eq"}
SHORT = {"max_completion_tokens": 16}


class ModelPolicy:
    """A model's answers replaced on the local Bedrock (POST /_local/models/{model}/policy), when the
    local Bedrock has that hook; `active` is False (and the deterministic answers stay) otherwise."""

    def __init__(self, stack, model, answer):
        from flask import Flask, jsonify, request

        app = Flask("eval-model-policy")

        @app.post("/policy")
        def policy():
            return jsonify({"responses": [[answer(p["messages"])] for p in request.get_json()["prompts"]]})
        self.server = servers.ThreadServer(app)
        self.control = f"http://127.0.0.1:{stack.bedrock.port}/_local/models/{model}/policy"
        self.active = http("POST", self.control, body={"url": f"http://127.0.0.1:{self.server.port}/policy"})[0] == 200

    def stop(self):
        if self.active:
            http("POST", self.control, body={"url": None})
        self.server.stop()


def _sum(messages):
    a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", messages[-1]["content"]).groups())
    return str(a + b)


def _team_id(client) -> str:
    return http("GET", f"{str(client.base_url).rstrip('/')}/me", client.api_key)[1]["team"]["id"]


def _headers(key: str) -> dict:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def _file(client, rows: int, seed: int = 3):
    return client.files.create(file=("eval.jsonl", jsonl(arithmetic_rows(rows, seed=seed))), purpose="fine-tune")


def _eval(client, *criteria, name="arith"):
    return client.evals.create(name=name, data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                               testing_criteria=list(criteria or (TUNED,)))


def _completions(model, file_id, **extra):
    return {"type": "completions", "model": model, "source": {"type": "file_id", "id": file_id},
            "input_messages": {"type": "item_reference", "item_reference": "item.messages"},
            "sampling_params": SHORT, **extra}


def _inline(model, n, **extra):
    rows = [{"item": r} for r in arithmetic_rows(n, seed=11)]
    return {"type": "completions", "model": model, "source": {"type": "file_content", "content": rows},
            "input_messages": {"type": "template", "template": [
                {"type": "message", "role": "user", "content": {"type": "input_text", "text": "Q: {{item.id}}"}}]},
            "sampling_params": SHORT, **extra}


def inference_entries(team_id, run_id):
    return [e for e in ledger.entries(team_id)
            if e.kind == "inference" and e.request_id.startswith(run_id + ".")]


def per(run, name):
    return next(p for p in run.per_testing_criteria_results if p.testing_criteria == name)


def raw(call, *args, **kwargs):
    """(status, JSON body) of an SDK call, through its raw-response wrapper."""
    response = call(*args, **kwargs)
    return response.http_response.status_code, json.loads(response.http_response.text)


# ---- the SDK end to end ----------------------------------------------------------------------------

def test_an_eval_on_a_base_model_and_a_tuned_alias_shows_the_difference(client, stack, bedrock):
    alias = f"eval-bot-{int(time.time() * 1000) % 10**8}"
    job = wait_for(client, start_job(client, suffix=alias).id, {"succeeded", "failed"}, timeout=60)
    assert job.status == "succeeded", job.error
    # The tuned model answers the sums (the base model keeps the local Bedrock's echo); without the
    # policy hook, the criterion that tells them apart is the model's name in the echo.
    policy = ModelPolicy(stack, job.fine_tuned_model, _sum)
    try:
        _end_to_end(client, job, alias, policy.active)
    finally:
        policy.stop()


def _end_to_end(client, job, alias, answered):
    team_id = _team_id(client)
    data = _file(client, 8)
    first = CORRECT if answered else TUNED
    status, body = raw(client.evals.with_raw_response.create, name="arith",
                       data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                       testing_criteria=[first, JUDGE])
    assert status == 201
    openai_spec.validate("post", "/v1/evals", 201, body)
    ev = client.evals.retrieve(body["id"])
    assert ev.data_source_config.schema_["properties"]["item"] == ITEM_SCHEMA
    assert [c.name for c in ev.testing_criteria] == [first["name"], "judge"]

    base = client.evals.runs.create(ev.id, name="base", data_source=_completions("openai.gpt-oss-20b", data.id))
    tuned = client.evals.runs.create(ev.id, name="tuned", data_source=_completions(alias, data.id))
    assert base.status == "queued" and tuned.model == alias
    assert tuned.model_extra["rft_upstream_model"] == job.fine_tuned_model
    base, tuned = wait_run(client, ev.id, base.id), wait_run(client, ev.id, tuned.id)
    assert (base.status, tuned.status) == ("completed", "completed"), (base.error, tuned.error)
    assert base.result_counts.total == tuned.result_counts.total == 8
    assert (per(base, first["name"]).passed, per(tuned, first["name"]).passed) == (0, 8)
    assert (base.result_counts.passed, tuned.result_counts.passed) == (0, 8)
    judge_base, judge_tuned = (per(r, "judge").model_extra["rft_mean_score"] for r in (base, tuned))
    assert judge_tuned is not None and judge_base is not None
    if answered:
        assert judge_tuned == 1.0 > judge_base                     # the stand-in judge: text similarity
    assert {u.model_name for u in tuned.per_model_usage} == {job.fine_tuned_model, "openai.gpt-oss-120b"}
    assert tuned.report_url.endswith(f"/console/evals/{ev.id}/runs/{tuned.id}")
    openai_spec.validate("get", "/v1/evals/{eval_id}/runs/{run_id}", 200,
                         raw(client.evals.runs.with_raw_response.retrieve, tuned.id, eval_id=ev.id)[1])

    # Output items: listed with the SDK's auto-pagination, filtered, retrieved, in OpenAI's shapes.
    items = list(client.evals.runs.output_items.list(tuned.id, eval_id=ev.id, limit=3))
    assert [i.datasource_item_id for i in items] == list(range(8))
    assert all(i.status == "pass" for i in items)
    if answered:
        assert [i.sample.output[0].content for i in items] == [i.datasource_item["reference_answer"] for i in items]
    assert {r.name for r in items[0].results} == {first["name"], "judge"}
    assert not list(client.evals.runs.output_items.list(base.id, eval_id=ev.id, status="pass"))
    page = raw(client.evals.runs.output_items.with_raw_response.list, tuned.id, eval_id=ev.id, limit=2)[1]
    openai_spec.validate("get", "/v1/evals/{eval_id}/runs/{run_id}/output_items", 200, page)
    assert page["has_more"] is True and page["first_id"] == items[0].id
    one = raw(client.evals.runs.output_items.with_raw_response.retrieve, items[5].id, eval_id=ev.id, run_id=tuned.id)
    openai_spec.validate("get", "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}", 200, one[1])

    # The comparison: per criterion deltas, and the items where the runs disagree most.
    diff = client.get(f"/evals/{ev.id}/compare", cast_to=object,
                      options={"params": {"runs": f"{base.id},{tuned.id}"}})
    by_name = {c["testing_criteria"]: c for c in diff["per_testing_criteria"]}
    assert by_name[first["name"]]["delta_mean_score"] == 1.0 and by_name[first["name"]]["delta_pass_rate"] == 1.0
    assert diff["items"] and diff["items"][0]["a"]["status"] == "fail" and diff["items"][0]["b"]["status"] == "pass"
    assert diff["rft_same_data_source"] is True

    # Every model call was metered: one inference entry per item and run, on the team's ledger.
    assert len(inference_entries(team_id, base.id)) == len(inference_entries(team_id, tuned.id)) == 8
    judges = [e for e in ledger.entries(team_id)
              if e.kind == "grader" and e.request_id.startswith(tuned.id + ".")]
    assert len(judges) == 8 and all(e.cost_micro > 0 for e in judges)


def test_api_shapes_lists_and_errors(client, make_team, stack, bedrock):
    ev = _eval(client, TUNED, JUDGE, name="shapes")
    _, listed = raw(client.evals.with_raw_response.list, limit=100)
    openai_spec.validate("get", "/v1/evals", 200, listed)
    assert ev.id in [e["id"] for e in listed["data"]]
    status, updated = raw(client.evals.with_raw_response.update, ev.id, name="renamed", metadata={"team": "search"})
    openai_spec.validate("post", "/v1/evals/{eval_id}", 200, updated)
    assert updated["name"] == "renamed" and updated["metadata"] == {"team": "search"}

    status, run = raw(client.evals.runs.with_raw_response.create, ev.id,
                      data_source=_inline("openai.gpt-oss-20b", 3), metadata={"purpose": "shapes"})
    assert status == 201
    openai_spec.validate("post", "/v1/evals/{eval_id}/runs", 201, run)
    done = wait_run(client, ev.id, run["id"])
    assert done.status == "completed" and done.result_counts.total == 3
    assert done.error.code == "" and done.metadata == {"purpose": "shapes"}
    _, runs = raw(client.evals.runs.with_raw_response.list, ev.id, status="completed")
    openai_spec.validate("get", "/v1/evals/{eval_id}/runs", 200, runs)
    assert [r["id"] for r in runs["data"]] == [run["id"]]
    assert client.evals.runs.list(ev.id, status="queued").data == []
    item = client.evals.runs.output_items.list(run["id"], eval_id=ev.id).data[0]
    assert item.sample.input[0].content.startswith("Q: row-") and item.sample.max_completion_tokens == 16

    with pytest.raises(openai.ConflictError):          # only a queued or running run can be canceled
        client.evals.runs.cancel(run["id"], eval_id=ev.id)
    queued = client.evals.runs.create(ev.id, data_source=_inline("openai.gpt-oss-20b", 2))
    status, cancelled = http("POST", f"{stack.base_url}/v1/evals/{ev.id}/runs/{queued.id}", client.api_key)
    assert status == 200 and cancelled["status"] == "canceled"     # OpenAI's document's cancel path
    openai_spec.validate_component("EvalRun", cancelled)
    assert client.evals.runs.cancel(queued.id, eval_id=ev.id).status == "canceled"   # the SDK's path, idempotent
    assert client.evals.runs.delete(run["id"], eval_id=ev.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(run["id"], eval_id=ev.id)
    end = time.monotonic() + 30                                   # the worker purges its items
    while list(EvalOutputItem.query(run["id"], consistent_read=True)):
        assert time.monotonic() < end, "a deleted run's items were not purged"
        time.sleep(0.2)

    bad = [({"testing_criteria": [{**TUNED, "type": "label_model"}]}, "testing_criteria[0].type"),
           ({"testing_criteria": [{"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
                                   "reference": "x", "evaluation_metric": "bleu"}]}, "testing_criteria[0].pass_threshold"),
           ({"testing_criteria": [TUNED, TUNED]}, "testing_criteria[1].name"),
           ({"testing_criteria": [{**JUDGE, "model": "not-a-model"}]}, "testing_criteria[0].model"),
           ({"data_source_config": {"type": "logs"}}, "data_source_config.type")]
    for change, param in bad:
        body = {"data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA}, "testing_criteria": [TUNED],
                **change}
        with pytest.raises(openai.BadRequestError) as err:
            client.evals.create(**body)
        assert err.value.param == param, (change, err.value.message)
    for source, param in ((_inline("no-such-model", 1), "data_source.model"),
                          ({**_inline("openai.gpt-oss-20b", 1), "source": {"type": "file_content", "content": [
                              {"item": {"messages": []}}]}}, "data_source.source"),
                          ({"type": "responses", "source": {"type": "file_id", "id": "file-x"}}, "data_source.type")):
        with pytest.raises(openai.BadRequestError) as err:
            client.evals.runs.create(ev.id, data_source=source)
        assert err.value.param == param, err.value.message
    with pytest.raises(openai.BadRequestError) as err:       # 400, as OpenAI's document lists
        client.evals.runs.create(ev.id, data_source=_completions("openai.gpt-oss-20b", "file-missing"))
    assert err.value.param == "data_source.source.id"

    # Another team's eval does not exist for this team.
    _, other_key = make_team("evals-other")
    other = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.evals.retrieve(ev.id)
    assert client.evals.delete(ev.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(ev.id)
    end = time.monotonic() + 30                                   # the worker purges its runs
    while list(EvalRunRecord.query(ev.id, consistent_read=True)):
        assert time.monotonic() < end, "a deleted eval's runs were not purged"
        time.sleep(0.2)


def test_a_jsonl_run_grades_given_outputs_and_calls_no_model(client, bedrock):
    team_id = _team_id(client)
    ev = _eval(client, CORRECT, name="jsonl")
    rows = arithmetic_rows(4, seed=5)
    content = [{"item": r, "sample": {"output_text": r["reference_answer"] if i % 2 else "no idea", "model": "mine"}}
               for i, r in enumerate(rows)]
    status, run = raw(client.evals.runs.with_raw_response.create, ev.id,
                      data_source={"type": "jsonl", "source": {"type": "file_content", "content": content}})
    openai_spec.validate("post", "/v1/evals/{eval_id}/runs", 201, run)
    done = wait_run(client, ev.id, run["id"])
    assert done.status == "completed" and (done.result_counts.passed, done.result_counts.failed) == (2, 2)
    assert per(done, "correct").model_extra["rft_mean_score"] == 0.5 and done.model == ""
    assert not inference_entries(team_id, run["id"])
    with pytest.raises(openai.BadRequestError) as err:          # a jsonl row must carry its output
        client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {
            "type": "file_content", "content": [{"item": rows[0]}]}})
    assert err.value.param == "data_source.source.content[0].sample"


def test_an_evals_file_is_a_runs_source_and_a_missing_or_foreign_file_is_the_same_400(client, stack, make_team,
                                                                                      bedrock):
    ev = _eval(client, CORRECT, name="evals-file")
    rows = arithmetic_rows(4, seed=6)
    lines = [{"item": r, "sample": {"output_text": r["reference_answer"] if i % 2 else "no idea"}}
             for i, r in enumerate(rows)]
    f = client.files.create(file=("eval.jsonl", jsonl(lines)), purpose="evals")
    run = client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": f.id}})
    done = wait_run(client, ev.id, run.id)
    assert done.status == "completed" and (done.result_counts.passed, done.result_counts.failed) == (2, 2)

    _, other_key = make_team("evals-file-other")
    other = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=other_key, max_retries=0)
    foreign = other.files.create(file=("eval.jsonl", jsonl(lines)), purpose="evals")
    answers = []
    for file_id in (foreign.id, "file-" + foreign.id[5:][::-1]):
        for source in ({"type": "jsonl", "source": {"type": "file_id", "id": file_id}},
                       _completions("openai.gpt-oss-20b", file_id)):
            status, body = _refused_raw(client, ev.id, source)
            # OpenAI's document gives this 400 its `Error` schema: the envelope's inner object.
            openai_spec.validate("post", "/v1/evals/{eval_id}/runs", status, body["error"])
            openai_spec.validate_component("ErrorResponse", body)
            answers.append((status, body["error"]["param"], body["error"]["message"].replace(file_id, "<id>")))
    assert len(set(answers)) == 1 and answers[0][:2] == (400, "data_source.source.id"), answers


def _refused_raw(client, eval_id, source):
    with pytest.raises(openai.APIStatusError) as caught:
        client.evals.runs.create(eval_id, data_source=source)
    return caught.value.status_code, caught.value.response.json()


# ---- resumable, metered, capped -------------------------------------------------------------------

class Crash(BaseException):
    """The worker's process dies (nothing after it runs: no lease is released)."""


def test_a_run_interrupted_and_resumed_never_bills_an_item_twice(client, bedrock, monkeypatch):
    team_id = _team_id(client)
    ev = _eval(client, TUNED)
    monkeypatch.setattr(evals, "enqueue", lambda *a, **k: True)   # this test drives the worker itself
    monkeypatch.setattr(eval_worker, "CONCURRENCY", 1)
    run = client.evals.runs.create(ev.id, data_source=_inline("openai.gpt-oss-20b", 6))
    real, calls = eval_worker._Worker.generate, []

    def dies_on_the_fourth(self, index, messages):
        calls.append(index)
        if len(calls) == 4:
            raise Crash()
        return real(self, index, messages)

    monkeypatch.setattr(eval_worker._Worker, "generate", dies_on_the_fourth)
    with deadline.running(300), pytest.raises(Crash):
        eval_worker.execute(team_id, ev.id, run.id)
    assert len(list(EvalOutputItem.query(run.id, consistent_read=True))) == 3
    assert len(inference_entries(team_id, run.id)) == 3
    with deadline.running(300):
        assert eval_worker.execute(team_id, ev.id, run.id) == "running elsewhere"   # its lease has not run out yet
    EvalRunRecord(ev.id, run.id).update(actions=[EvalRunRecord.lease_until.set(0)])   # ... now it has
    monkeypatch.setattr(eval_worker._Worker, "generate", real)
    with deadline.running(300):
        assert eval_worker.execute(team_id, ev.id, run.id) == "completed"
    done = client.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert done.status == "completed" and done.result_counts.total == 6
    entries = inference_entries(team_id, run.id)
    assert sorted(e.request_id for e in entries) == [f"{run.id}.{i}" for i in range(6)]   # each item once
    assert int(EvalRunRecord.get(ev.id, run.id).summary["cost_micro"]) == sum(e.cost_micro for e in entries)


def test_a_run_short_of_time_continues_in_a_fresh_invocation(client, bedrock, monkeypatch):
    team_id = _team_id(client)
    ev = _eval(client, TUNED)
    sent = []
    monkeypatch.setattr(evals, "enqueue", lambda record, delay=0: sent.append(record.run_id) or True)
    monkeypatch.setattr(eval_worker, "CONCURRENCY", 1)
    run = client.evals.runs.create(ev.id, data_source=_inline("openai.gpt-oss-20b", 5))
    real, checks = eval_worker._Worker.check, []

    def short_of_time(self):
        checks.append(1)
        if len(checks) == 3:
            return eval_worker.StopRun(None, "continue", "time is nearly up")
        return real(self)

    monkeypatch.setattr(eval_worker._Worker, "check", short_of_time)
    with deadline.running(300):
        assert eval_worker.execute(team_id, ev.id, run.id) == "continued"
    record = EvalRunRecord.get(ev.id, run.id, consistent_read=True)
    assert record.status == "in_progress" and record.lease_until == 0 and record.attempts == 0
    assert sent == [run.id, run.id] and 0 < record.summary["result_counts"]["total"] < 5
    with deadline.running(300):
        assert eval_worker.execute(team_id, ev.id, run.id) == "completed"
    assert len(inference_entries(team_id, run.id)) == 5


def test_a_run_stops_at_its_cost_cap_and_at_the_team_budget(client, api, admin_headers, bedrock):
    team_id = _team_id(client)
    ev = _eval(client, TUNED)
    # An item's worst case is 8 micro-dollars (its rendered prompt and 16 output tokens): caps of 2
    # and 1.5 items stop the runs early.
    capped = client.evals.runs.create(ev.id, data_source=_inline("openai.gpt-oss-20b", 10),
                                      extra_body={"rft_max_usd": "0.00002"})
    by_metadata = client.evals.runs.create(ev.id, data_source=_inline("openai.gpt-oss-20b", 10),
                                           metadata={"rft_max_usd": "0.000012"})
    for run, cap in ((capped, 20), (by_metadata, 12)):
        done = wait_run(client, ev.id, run.id)
        assert done.status == "canceled" and done.error.code == "cost_cap_reached", done.error
        assert 0 < done.result_counts.total < 10
        spent = sum(e.cost_micro for e in inference_entries(team_id, run.id))
        assert spent <= cap and done.model_extra["rft_max_usd"] == f"{cap / 1e6:.6f}"
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.runs.create(ev.id, data_source=_inline("openai.gpt-oss-20b", 1), extra_body={"rft_max_usd": "x"})
    assert err.value.param == "rft_max_usd"

    # The team's budget holds eval calls like any call: out of budget, the run stops with the reason.
    r = api.http.put(f"/v1/admin/teams/{team_id}/budget", headers=admin_headers,
                     body=json.dumps({"limit_usd": "0.00002", "alert_thresholds": []}))
    assert r.status_code == 200
    budgets._config.invalidate(team_id)
    starved = wait_run(client, ev.id, client.evals.runs.create(ev.id, data_source=_inline("openai.gpt-oss-20b", 10)).id)
    assert starved.status == "canceled" and starved.error.code == "budget_exhausted", starved.error
    assert starved.result_counts.total < 10


# ---- promotion gates --------------------------------------------------------------------------------

def _point(stack, key, **body):
    return http("POST", f"{stack.base_url}/v1/models/aliases", key, body)


def _outbound(predicate, timeout=15):
    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=f"{outbox.bus_name()}-outbound-tap")["QueueUrl"]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for msg in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            body = json.loads(msg["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])
            if predicate(body):
                return body
    raise AssertionError("event not seen on the bus")


def test_a_gated_alias_moves_only_to_a_model_that_passes(client, stack, bedrock):
    alias = f"gated-{int(time.time() * 1000) % 10**8}"
    job = wait_for(client, start_job(client, suffix=alias).id, {"succeeded", "failed"}, timeout=60)
    assert job.status == "succeeded", job.error
    team_id, key = _team_id(client), client.api_key
    steps = {c["step"]: c["model"] for c in client.models.retrieve(job.fine_tuned_model).model_extra["rft_checkpoints"]}
    step3, step4 = steps[3], steps[4]
    ev = _eval(client, {"type": "string_check", "name": "step4", "input": "{{sample.output_text}}",
                        "reference": "ckpt-step-4", "operation": "like"}, name="gate")
    # A gate pins its data, input messages and sampling (issue #23 M2): 20 inline rows here.
    pin = {k: v for k, v in _inline("x", 20).items() if k not in ("type", "model")}
    gate = {"eval_id": ev.id, "criteria": {"step4": 1.0}, "data_source": pin}
    status, answer = _point(stack, key, alias=alias, model=job.fine_tuned_model, gate=gate)
    assert status == 200 and answer["rft_gate"]["criteria"] == gate["criteria"], answer
    assert answer["rft_gate"]["no_worse_than_current"] is False and answer["rft_gate"]["min_items"] == 20
    status, answer = _point(stack, key, alias=alias, model=job.fine_tuned_model,
                            gate={"eval_id": ev.id, "criteria": {"step4": 0.0}, "data_source": pin})
    assert status == 403 and answer["error"]["code"] == "permission_denied"          # a team cannot loosen it

    status, answer = _point(stack, key, alias=alias, model=step4)                        # no run yet
    assert status == 409 and answer["error"]["code"] == "gate_failed" and "no completed run" in answer["error"]["message"]
    runs = {}
    for model in (step3, step4):
        runs[model] = wait_run(client, ev.id, client.evals.runs.create(ev.id, data_source=_inline(model, 20)).id)
        assert runs[model].status == "completed"
    status, answer = _point(stack, key, alias=alias, model=step3)
    assert status == 409 and "criterion 'step4' scored 0.0000" in answer["error"]["message"], answer
    assert runs[step3].id in answer["error"]["message"]
    status, answer = _point(stack, key, alias=alias, model=step4)
    assert status == 200 and answer["rft_target"] == step4 and answer["rft_evidence"]["eval_run_id"] == runs[step4].id
    event = _outbound(lambda b: b["detail-type"] == "rft-hub.alias.changed" and b["detail"]["alias"] == alias
                      and b["detail"]["model"] == step4)
    assert event["detail"]["eval_run_id"] == runs[step4].id and event["detail"]["comparison"]["step4"]["score"] == 1.0

    # no_worse_than_current: the admin changes the gate; a move to a worse model is refused.
    status, answer = _point(stack, ADMIN_KEY, team_id=team_id, alias=alias, model=step4,
                            gate={"eval_id": ev.id, "no_worse_than_current": True, "data_source": pin})
    assert status == 200 and answer["rft_gate"]["no_worse_than_current"] is True
    status, answer = _point(stack, key, alias=alias, model=step3)
    assert status == 409 and "worse than the current model's 1.0000" in answer["error"]["message"], answer
    status, answer = _point(stack, key, alias=alias, model=step3, override_reason="I insist")
    assert status == 403                                                                  # overrides are the admin's
    status, answer = _point(stack, ADMIN_KEY, team_id=team_id, alias=alias, model=step3,
                            override_reason="rollback requested by the on-call")
    assert status == 200 and answer["rft_target"] == step3
    history = http("GET", f"{stack.base_url}/v1/models/aliases/{alias}/history", key)[1]["data"]
    assert [h["model"] for h in history] == [step3, step4, job.fine_tuned_model]
    assert history[0]["override_reason"] == "rollback requested by the on-call" and history[0]["changed_by"] == "admin"
    assert history[1]["eval_run_id"] == runs[step4].id and history[1]["comparison"]["step4"]["min_score"] == 1.0
    assert "eval_run_id" not in history[2]                                               # the job's own first point
    # The audit log (issue #29): the team's gate set, the admin's gate change and override, one entry each.
    from chalicelib.domain import keys
    from chalicelib.store.models import AuditEntry
    acts = sorted((e.action, e.actor) for e in AuditEntry.query("audit", consistent_read=True)
                  if e.target == f"alias:{alias}" and e.team_id == team_id)
    assert acts == [("alias.override", "admin"), ("gate.set", "admin"), ("gate.set", f"key:{keys.parse_key_id(key)}")]


# ---- the eval a fine-tuning job names -----------------------------------------------------------------

def test_a_succeeded_job_runs_its_eval_on_base_tuned_and_checkpoints(client, bedrock):
    register_graders(client)
    ev = _eval(client, TUNED, name="job-eval")
    data = _file(client, 4)
    train = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=train.id,
                                       extra_body={"method": rft(), "rft_eval": {"eval_id": "eval_missing"}})
    assert err.value.param == "rft_eval.eval_id"
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=train.id, extra_body={
        "method": rft(), "rft_eval": {"eval_id": ev.id, "file_id": data.id, "sampling_params": SHORT}})
    assert wait_for(client, job.id, {"succeeded", "failed"}, timeout=60).status == "succeeded"
    end = time.monotonic() + 120
    while True:
        found = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if "comparison" in e.message]
        if found:
            break
        assert time.monotonic() < end, "no eval comparison on the job's events"
        time.sleep(0.5)
    comparison = found[0].data
    roles = {r["role"]: r for r in comparison["runs"]}
    assert set(roles) == {"base", "tuned", "checkpoint"} and all(r["status"] == "completed" for r in comparison["runs"])
    assert roles["base"]["mean_scores"]["tuned"] == 0.0 and roles["tuned"]["mean_scores"]["tuned"] == 1.0
    vs_base = {c["testing_criteria"]: c for c in roles["tuned"]["vs_base"]}
    assert vs_base["tuned"]["delta_mean_score"] == 1.0
    runs = client.evals.runs.list(ev.id, limit=100).data
    assert {r.model_extra["rft_job_id"] for r in runs} == {job.id} and len(runs) == len(comparison["runs"])


# ---- the rules alone (no servers) --------------------------------------------------------------------

def test_gate_rules():
    from chalicelib.domain import evals as rules

    with pytest.raises(rules.EvalRuleError) as err:
        rules.check_gate({"eval_id": "e", "criteria": {"nope": 1}}, ["a"])
    assert err.value.param == "gate.criteria.nope"
    with pytest.raises(rules.EvalRuleError):
        rules.check_gate({"eval_id": "e"}, ["a"])                     # neither criteria nor no_worse_than_current
    gate = rules.check_gate({"eval_id": "e", "criteria": {"a": 0.5}, "no_worse_than_current": True}, ["a", "b"])

    def summary(**scores):
        tally = rules.Tally(list(scores))
        for name, score in scores.items():
            tally.add("pass", False, [{"name": name, "score": score, "passed": True}], {}, 0)
        return tally.summary()

    assert rules.gate_failures(gate, summary(a=0.6, b=0.9), summary(a=0.6, b=0.8))[0] == []
    failures, comparison = rules.gate_failures(gate, summary(a=0.4, b=0.7), summary(a=0.3, b=0.8))
    assert failures == ["criterion 'a' scored 0.4000, below the gate's minimum 0.5",
                        "criterion 'b' scored 0.7000, worse than the current model's 0.8000"]
    assert comparison["b"] == {"score": 0.7, "current_score": 0.8, "delta": -0.1}


def test_item_schemas_rows_and_comparisons():
    from chalicelib.domain import evals as rules

    schema = {"type": "object", "required": ["q"], "additionalProperties": False,
              "properties": {"q": {"type": "string", "minLength": 1}, "n": {"type": "integer", "maximum": 3}}}
    assert rules.schema_errors(schema, {"q": "x", "n": 2}) == []
    assert rules.schema_errors(schema, {"n": 2.5, "z": 1}) == ["item.q: required", "item.n: must be integer",
                                                              "item.z: not allowed"]
    assert rules.split_row({"item": {"q": "x"}, "sample": {"output_text": "y"}}) == ({"q": "x"}, {"output_text": "y"})
    assert rules.split_row({"messages": [], "reference_answer": "4"}) == ({"messages": [], "reference_answer": "4"}, None)
    assert rules.sample_text({"choices": [{"message": {"content": "hi"}}]}) == "hi"
    a = {0: {"status": "pass", "scores": {"x": 1.0}}, 1: {"status": "pass", "scores": {"x": 0.5}}}
    b = {0: {"status": "fail", "scores": {"x": 0.0}}, 1: {"status": "pass", "scores": {"x": 0.6}}}
    worst = rules.disagreements(a, b, 10)
    assert [d["datasource_item_id"] for d in worst] == [0, 1] and worst[0]["disagreement"] == 2.0
