"""Per-sample overhead of rft-hub's reward wrapper (issue #16): every reward goes through the hosted
grader, which invokes a team's own Lambda grader with Bedrock's contract, then records the rollouts
and runs the training watch.

Same batch (64 samples: 16 prompts x 4 rollouts, the exact-match example grader), same process,
interleaved rounds, medians:

* direct   -- the team's Lambda invoked as Bedrock would (lambdas.invoke, the Lambda Invoke API);
* wrapped  -- hosted_grader.handle on rows without a job: planning, the invocation, the contract
  check (the wrapping alone);
* recorded -- the same rows of a real job: plus the rollouts (S3 object, window ADD, kept items)
  and the watch's analysis (its two window queries).

Overhead per sample = (median - direct median) / 64. Against the local servers on loopback (and
DynamoDB Local through no fault proxy), so network latency to AWS is not in it: deployed, the
recording adds about 4 round trips per invocation (S3 PUT, 1 UpdateItem counter, BatchWriteItem,
UpdateItem window) and 2 queries, not per sample.
"""
from __future__ import annotations

import json
import statistics
import time

from bench.common import start_stack

BATCH, PROMPTS, ROUNDS = 64, 16, 40


def run(rounds: int = ROUNDS) -> dict:
    stack, _ = start_stack(fault_layer=False)
    from chalicelib.adapters import lambdas
    from chalicelib.domain import ids
    from chalicelib.grading import graders
    from chalicelib.store.models import Job
    from chalicelib.training import hosted_grader, rollouts
    from local.example_graders import arn

    function = arn("rft-grader-example-exact-match")
    rows = []
    for i in range(BATCH):
        p = i // (BATCH // PROMPTS)
        rows.append({"id": f"row-{p}-{i}", "reference_answer": str(100 + p), "difficulty": "easy",
                     "messages": [{"role": "system", "content": "You are a careful calculator."},
                                  {"role": "user", "content": f"What is 50 + {50 + p}? Answer with the number only."},
                                  {"role": "assistant", "content": str(100 + p + (i % 2))}]})
    ref = graders.store_spec({"type": "lambda", "name": "team", "lambda": {"function": function}})
    team_id, job_id = "team-bench-wrap", ids.new_id("ftjob")
    now = ids.now()
    method = {"type": "reinforcement", "reinforcement": {"grader": {"type": "lambda", "lambda": {"function": function}}}}
    Job(team_id, job_id, status="running", model="openai.gpt-oss-20b", training_file="file-bench", method=method,
        bedrock_method=method, created_at=now, updated_at=now, request_hash="h", submit_state="submitted",
        status_path=["running"]).save()
    rollouts.configure(team_id, job_id, "alert", None)
    wrapped = [{**r, graders.REF_FIELD: ref, hosted_grader.PROMPT_FIELD: r["id"].rsplit("-", 1)[0]} for r in rows]
    recorded = [{**r, hosted_grader.JOB_FIELD: f"{team_id}/{job_id}"} for r in wrapped]

    def direct():
        return lambdas.invoke(function, rows)

    calls = {"direct": direct, "wrapped": lambda: hosted_grader.handle(wrapped),
             "recorded": lambda: hosted_grader.handle(recorded)}
    same = [o["aggregate_reward_score"] for o in hosted_grader.handle(wrapped)] == \
        [float(o["aggregate_reward_score"]) for o in direct()]
    for fn in calls.values():          # warm: clients, caches, the spec
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) * 1000)
    stack.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"benchmark": "reward_wrap", "samples_per_invocation": BATCH, "rounds": rounds,
            "scores_identical": same,
            "median_ms": {k: round(v, 2) for k, v in med.items()},
            "overhead_per_sample_ms": {"wrapping": round((med["wrapped"] - med["direct"]) / BATCH, 3),
                                       "wrapping_and_recording": round((med["recorded"] - med["direct"]) / BATCH, 3)},
            "overhead_per_invocation_ms": {"wrapping": round(med["wrapped"] - med["direct"], 2),
                                           "wrapping_and_recording": round(med["recorded"] - med["direct"], 2)}}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
