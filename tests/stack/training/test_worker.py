"""Slow work off the request path, honest deadlines and Lambda's payload limit.

Job creation answers at once; the worker (an SQS consumer, drained here as Lambda would)
preflights graders that call out, prepares the dataset and submits. The hosted grader grades
in parallel with a deadline per sample; Lambda grader batches stay under 6 MB."""
import json
import types

import pytest
from helpers import wait_for
from sample_data import arithmetic_rows, jsonl

from chalicelib.domain.graders import Deps, build, rows
from chalicelib.domain.graders.contract import MAX_INVOKE_BYTES
from chalicelib.domain.graders.templates import make_sample
from chalicelib.grading import graders
from chalicelib.training import hosted_grader

JUDGE = {"type": "score_model", "name": "judge", "model": "openai.gpt-oss-120b", "range": [0, 1],
         "input": [{"role": "user", "content": "Reference: {{item.reference_answer}}\nAnswer: {{sample.output_text}}"}]}


def test_a_slow_judge_never_delays_job_creation(client, bedrock):
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    bedrock.latency_ms = 2000                      # every judge call (and every Bedrock call) takes 2 s
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, extra_body={
        "method": {"type": "reinforcement", "reinforcement": {"grader": JUDGE}}})
    # Answered before a single 2 s judge call could have finished: the preflight is the worker's.
    assert job.status == "validating_files" and job.model_extra["rft_preflight"] is None
    assert job.model_extra["rft_submission"] == "pending"
    bedrock.latency_ms = 0
    done = wait_for(client, job.id, {"succeeded", "failed"}, timeout=120)
    assert done.status == "succeeded", done.error
    assert done.model_extra["rft_preflight"]["rows_used"] > 0 and done.model_extra["rft_bedrock_job_id"]


def _rows(team_id, n, ref):
    return [{"id": f"s{i}", "reference_answer": "42", rows.REF_FIELD: ref,
             rows.JOB_FIELD: f"{team_id}/ftjob-deadline",
             "messages": [{"role": "user", "content": "6 x 7?"}, {"role": "assistant", "content": "42"}]}
            for i in range(n)]


def _context(ms):
    return types.SimpleNamespace(get_remaining_time_in_millis=lambda: ms)


def test_hosted_grader_gives_every_sample_a_real_score_when_it_has_the_time(make_team, bedrock):
    team_id, _ = make_team("deadlines")
    ref = graders.store_spec(JUDGE)
    bedrock.latency_ms = 500                       # a judge taking 0.5 s per call
    out = hosted_grader.handle(_rows(team_id, 64, ref), _context(300_000))
    assert len(out) == 64 and [o["id"] for o in out] == [f"s{i}" for i in range(64)]
    assert all(o["aggregate_reward_score"] == 1.0 for o in out), [o for o in out if o["aggregate_reward_score"] != 1]
    assert not any(m["name"].startswith("error.") for o in out for m in o["metrics_list"])


def test_samples_the_invocation_had_no_time_for_are_marked_not_zeroed_silently(make_team, bedrock):
    team_id, _ = make_team("deadlines-short")
    ref = graders.store_spec(JUDGE)
    bedrock.latency_ms = 500
    out = hosted_grader.handle(_rows(team_id, 64, ref), _context(2_000))   # about 1 s usable
    assert len(out) == 64
    def errors(o):
        return {m["name"] for m in o["metrics_list"] if m["name"].startswith("error.")}

    # Every sample is graded, or carries the reason it is not: never a silent 0.
    assert all(o["aggregate_reward_score"] == 1.0 or errors(o) for o in out)
    not_started = [o for o in out if "error.unresponsive_reward_error" in errors(o)]
    assert not_started                                       # 64 x 0.5 s do not fit in about 1 s


def test_lambda_grader_batches_stay_under_the_invoke_limit():
    sizes = []

    def invoke(arn, rows):
        sizes.append(len(json.dumps(rows).encode()))
        return [{"id": r["id"], "aggregate_reward_score": 1.0} for r in rows]

    grader = build({"type": "lambda", "lambda": {"function":
                                                 "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-x"}})
    big = "x" * 1_500_000
    pairs = [(make_sample(big), {"id": f"r{i}", "reference_answer": "x"}) for i in range(10)]
    pairs.append((make_sample("y" * (MAX_INVOKE_BYTES + 10)), {"id": "huge"}))
    results = grader.grade_batch(pairs, Deps(invoke_lambda=invoke))
    assert len(sizes) >= 3 and max(sizes) < 6_291_456                       # split, each under Lambda's limit
    assert [r.reward for r in results[:10]] == [1.0] * 10
    assert results[10].errors == {"lambda_error"} and "6 MB" in results[10].details


def test_a_request_over_6_mb_is_refused_by_the_local_lambda_as_by_lambda(stack):
    from chalicelib.adapters import lambdas
    arn = "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-example-exact-match"
    with pytest.raises(RuntimeError, match="6 MB"):
        lambdas.invoke(arn, [{"id": "a", "messages": [{"role": "assistant", "content": "x" * 6_400_000}]}])
