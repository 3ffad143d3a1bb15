"""End-to-end RFT with the unmodified openai SDK against rft-hub.

    make run            # in one terminal
    .venv/bin/python examples/quickstart.py

Reads the base URL and demo key from .local/stack.json unless OPENAI_BASE_URL and
OPENAI_API_KEY are set. Uploads 150 prompts, trains with a Lambda grader, follows
the reward curve, and prints the tuned model and its checkpoints.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_data import arithmetic_rows, jsonl  # noqa: E402 - after sys.path is set

# A team's own reward Lambda, named rft-grader-*; `make run` registers it to the demo team (an admin's step).
GRADER_ARN = "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-example-exact-match"


def main() -> None:
    stack_file = Path(__file__).resolve().parent.parent / ".local" / "stack.json"
    stack = json.loads(stack_file.read_text()) if stack_file.exists() else {}
    client = openai.OpenAI(base_url=os.environ.get("OPENAI_BASE_URL") or stack["openai_base_url"],
                           api_key=os.environ.get("OPENAI_API_KEY") or stack["demo_key"])

    training = client.files.create(file=("arithmetic.jsonl", jsonl(arithmetic_rows(150))), purpose="fine-tune")
    print(f"uploaded {training.id}: {training.model_extra['rft_validation']['rows']} rows")

    job = client.fine_tuning.jobs.create(
        model="openai.gpt-oss-20b", training_file=training.id, suffix="calculator",
        # As in AWS's notebooks: the SDK's typed grader union has no "lambda", so pass the method raw.
        extra_body={"method": {"type": "reinforcement", "reinforcement": {
            "grader": {"type": "lambda", "lambda": {"function": GRADER_ARN}},
            "hyperparameters": {"n_epochs": 1, "batch_size": 4}}}})
    print(f"job {job.id}: {job.status}; estimate {job.model_extra['rft_cost_estimate']['estimated_usd']} USD")

    seen = set()
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=50).data):
            if event.id not in seen:
                seen.add(event.id)
                reward = f" reward={event.data['critic_rewards_mean']}" if event.type == "metrics" else ""
                print(f"  [{event.level}] {event.message}{reward}")
    print(f"job {job.id}: {job.status}, fine_tuned_model={job.fine_tuned_model}")
    for ck in client.fine_tuning.jobs.checkpoints.list(job.id).data:
        print(f"  checkpoint step {ck.step_number}: {ck.fine_tuned_model_checkpoint}")
    if job.status == "succeeded":
        # The tuned model answers by its suffix alias, metered like any call (x-rft-cost-usd).
        reply = client.chat.completions.with_raw_response.create(
            model="calculator", max_tokens=16, messages=[{"role": "user", "content": "What is 17 + 25?"}])
        print(f"calculator says {reply.parse().choices[0].message.content!r} "
              f"for {reply.headers['x-rft-cost-usd']} USD")


if __name__ == "__main__":
    main()
