"""A pipeline end to end (docs/pipelines.md): new data -> train -> eval -> gate -> Slack approval -> alias.

    make run                                   # in one terminal
    .venv/bin/python examples/pipeline.py      # uploads a week's prompts; the run waits for approval
    curl -s -X POST http://127.0.0.1:8005/_local/slack/click -H 'Content-Type: application/json' \\
         -d '{"action": "approve", "user": "U0DEMOAPPROVER"}'
    .venv/bin/python examples/pipeline.py --status

`make run` creates the demo team's pipeline (`ensure`, below); this script uses it (or creates it, with
another base URL and key). Reads the base URL and demo key from .local/stack.json unless OPENAI_BASE_URL
and OPENAI_API_KEY are set.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_data import arithmetic_rows, jsonl  # noqa: E402 - after sys.path is set

NAME, ALIAS, APPROVER = "demo-weekly", "calculator-weekly", "U0DEMOAPPROVER"
GRADER_ARN = "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-example-exact-match"
ITEM_SCHEMA = {"type": "object", "required": ["messages", "reference_answer"],
               "properties": {"messages": {"type": "array"}, "reference_answer": {"type": "string"}}}
# The local Bedrock's tuned models say their name (":ft:"); an exact-answer criterion would do on AWS.
CRITERION = {"type": "string_check", "name": "tuned", "input": "{{sample.output_text}}", "reference": ":ft:",
             "operation": "like"}


def call(base: str, key: str, method: str, path: str, body=None, *, raw: bytes | None = None,
         content_type: str = "application/json"):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"{base}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _file(base: str, key: str, rows: list[dict], name: str) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=2)
    return client.files.create(file=(name, jsonl(rows)), purpose="fine-tune").id


def ensure(base: str, key: str) -> dict:
    """The demo pipeline (idempotent: an existing one of the name is kept)."""
    status, listed = call(base, key, "GET", "/v1/pipelines?limit=100")
    found = next((p for p in (listed or {}).get("data", []) if p["name"] == NAME), None)
    if found:
        return found
    eval_file = _file(base, key, arithmetic_rows(20, seed=99), "eval.jsonl")
    status, ev = call(base, key, "POST", "/v1/evals", {
        "name": "weekly gate", "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA},
        "testing_criteria": [CRITERION]})
    if status not in (200, 201):
        raise RuntimeError(f"eval: {status} {ev}")
    status, made = call(base, key, "POST", "/v1/pipelines", {
        "name": NAME, "dataset": {"prefix": True},
        "job": {"model": "openai.gpt-oss-20b", "method": {"type": "reinforcement", "reinforcement": {
            "grader": {"type": "lambda", "lambda": {"function": GRADER_ARN}},
            "hyperparameters": {"n_epochs": 1, "batch_size": 4}}}},
        "eval": {"eval_id": ev["id"], "criteria": {"tuned": 1.0}, "no_worse_than_current": True,
                 "data_source": {"source": {"type": "file_id", "id": eval_file},
                                 "input_messages": {"type": "item_reference", "item_reference": "item.messages"},
                                 "sampling_params": {"max_completion_tokens": 16}}},
        "target_alias": ALIAS, "approval": {"mode": "slack", "approvers": [APPROVER], "timeout_seconds": 86400},
        "triggers": {"new_data": True, "on_busy": "queue"}})
    if status != 201:
        raise RuntimeError(f"pipeline: {status} {made}")
    return made


def main() -> None:
    state = os.environ.get("RFT_LOCAL_STATE") or Path(__file__).resolve().parent.parent / ".local"
    stack_file = Path(state) / "stack.json"
    stack = json.loads(stack_file.read_text()) if stack_file.exists() else {}
    base = (os.environ.get("OPENAI_BASE_URL") or stack["openai_base_url"]).rstrip("/").removesuffix("/v1")
    key = os.environ.get("OPENAI_API_KEY") or stack["demo_key"]
    pipeline = ensure(base, key)
    print(f"pipeline {pipeline['name']} ({pipeline['id']}), v{pipeline['version']}: data under "
          f"{pipeline['dataset_prefix']}")
    if "--status" in sys.argv:
        status, runs = call(base, key, "GET", f"/v1/pipelines/{pipeline['id']}/runs?limit=3")
        for run in runs["data"]:
            print(f"  run {run['id']}: {run['status']}" + (f" ({run['error']['message']})" if run["error"] else ""))
        status, history = call(base, key, "GET", f"/v1/models/aliases/{ALIAS}/history")
        if status == 200:
            top = history["data"][0]
            print(f"alias {ALIAS} v{top['version']} -> {top['model']}, changed by {top['changed_by']}")
        return

    # A new week of labelled prompts, put under the pipeline's prefix with a presigned URL: the upload
    # itself starts the run (S3's EventBridge notification).
    status, up = call(base, key, "POST", f"/v1/pipelines/{pipeline['id']}/uploads", {"filename": "week.jsonl"})
    rows = arithmetic_rows(120, seed=random.randrange(10**6))
    req = urllib.request.Request(up["url"], data=jsonl(rows), method="PUT", headers={"Content-Type": "application/jsonl"})
    urllib.request.urlopen(req, timeout=60).read()
    print(f"uploaded {len(rows)} prompts to {up['key']}")
    deadline, shown, run = time.time() + 600, set(), None
    while time.time() < deadline:
        status, runs = call(base, key, "GET", f"/v1/pipelines/{pipeline['id']}/runs?limit=5")
        run = next((r for r in runs["data"] if (r["trigger"].get("detail") or {}).get("key") == up["key"]), None)
        if run:
            for step in run["steps"]:
                if (step["name"], step["status"]) not in shown:
                    shown.add((step["name"], step["status"]))
                    print(f"  {step['name']}: {step['status']}")
            if run["status"] != "running":
                break
        time.sleep(2)
    if run is None or run["status"] != "awaiting_approval":
        print(f"run ended {run and run['status']}: {run and run['error']}")
        return
    print(f"run {run['id']} awaits approval; comparison: {json.dumps(run['comparison'])}")
    sink = stack.get("services", {}).get("slack", "http://127.0.0.1:8005")
    print(f"approve it as {APPROVER} (the Slack message is at {sink}/messages):\n"
          f"  curl -s -X POST {sink}/_local/slack/click -H 'Content-Type: application/json' "
          f"-d '{{\"action\": \"approve\", \"user\": \"{APPROVER}\"}}'\n"
          f"then: .venv/bin/python examples/pipeline.py --status")


if __name__ == "__main__":
    main()
