"""Reconciler scale: one run over 1,000 in-flight jobs against the local Bedrock.

Compared in the same run with the same pass done one job at a time (concurrency 1).
The target (issue #5): 1,000 jobs within the reconciler Lambda's time limit (5 minutes;
rft-hub stops starting work after RFT_RECONCILE_DEADLINE = 240 s).
"""
from __future__ import annotations

import json
import time

from bench.common import start_stack

JOBS = 1000


def run(jobs: int = JOBS) -> dict:
    stack, _ = start_stack()
    stack.bedrock_state.clock.update({"validating_seconds": 10_000})   # keep them in flight
    import openai
    from aws_bedrock_token_generator import provide_token
    from sample_data import arithmetic_rows, jsonl

    from chalicelib.domain import ids
    from chalicelib.store.models import Job
    from chalicelib.training import lifecycle

    bedrock = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.bedrock.port}/v1",
                            api_key=provide_token(region="us-west-2"), max_retries=0)
    training = bedrock.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune").id
    method = {"type": "reinforcement", "reinforcement": {"grader": {"type": "lambda", "lambda": {
        "function": "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-example-exact-match"}}}}
    now = ids.now()
    with Job.batch_write() as batch:
        for i in range(jobs):
            remote = bedrock.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=training,
                                                     extra_body={"method": method})
            batch.save(Job(f"team-bench-{i % 20}", ids.new_id("ftjob"), status="validating_files",
                           model="openai.gpt-oss-20b", training_file="file-bench", method=method, bedrock_method=method,
                           created_at=now, updated_at=now, last_progress_at=now, request_hash="h",
                           submit_state="submitted", bedrock_job_id=remote.id, active_shard="active",
                           status_path=["validating_files"]))
    lifecycle.reconcile(concurrency=16)          # first pass copies each job's first event
    timings = {}
    for concurrency in (1, 16):
        started = time.perf_counter()
        report = lifecycle.reconcile(concurrency=concurrency)
        timings[concurrency] = (time.perf_counter() - started, report.view())
    stack.stop()
    seq, conc = timings[1], timings[16]
    return {"benchmark": "reconciler", "in_flight_jobs": jobs,
            "concurrency_1": {"seconds": round(seq[0], 2), "jobs_per_s": int(jobs / seq[0]),
                              "checked": seq[1]["checked"], "errors": seq[1]["errors"]},
            "concurrency_16": {"seconds": round(conc[0], 2), "jobs_per_s": int(jobs / conc[0]),
                               "checked": conc[1]["checked"], "errors": conc[1]["errors"]},
            "speedup": round(seq[0] / conc[0], 2), "limit_seconds": 240}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
