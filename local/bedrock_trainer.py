"""The local Bedrock's training clock: jobs advance on it, each step samples rollouts (from the
stand-in model or a test's policy URL), scores them through the job's grader Lambda and records
metrics events and checkpoints; state changes go to EventBridge."""
from __future__ import annotations

import json
import math
import os
import random
import time
import urllib.request
import uuid
from typing import Any

import boto3

from local.bedrock_state import STATE_TO_NATIVE, TERMINAL, State


def public_job(job: dict) -> dict:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def add_event(state: State, job: dict, message: str, type_: str = "message", data: dict | None = None,
           level: str = "info") -> None:
    state.events[job["id"]].append({"id": "ftevent-" + uuid.uuid4().hex, "object": "fine_tuning.job.event",
                                    "created_at": int(time.time()), "level": level, "message": message,
                                    "type": type_, "data": data or {}})


def set_status(state: State, job: dict, status: str, error: dict | None = None) -> None:
    job["status"] = status
    job["_phase_at"] = time.monotonic()
    if status in TERMINAL:
        job["finished_at"] = int(time.time())
    if error:
        job["error"] = error
    add_event(state, job, f"Job {status.replace('_', ' ')}.", level="error" if status == "failed" else "info")
    _publish(state, job)


def _publish(state: State, job: dict) -> None:
    native = STATE_TO_NATIVE.get(job["status"])
    if not native or not state.mantle_events:   # /_local/config {"mantle_events": true} turns them on
        return
    arn = f"arn:aws:bedrock:{state.region}:{state.account}:model-customization-job/{job['id']}"
    detail = {"version": "0.0", "jobName": job["id"], "jobArn": arn, "outputModelName": job.get("fine_tuned_model"),
              "outputModelArn": None, "roleArn": f"arn:aws:iam::{state.account}:role/BedrockRFT",
              "jobStatus": native, "creationTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job["created_at"])),
              "lastModifiedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "baseModelArn": f"arn:aws:bedrock:{state.region}::foundation-model/{job['model']}"}
    if job.get("error"):
        detail["failureMessage"] = job["error"]["message"]
    if job["status"] in TERMINAL:
        detail["endTime"] = detail["lastModifiedTime"]
    entry = {"Source": "aws.bedrock", "DetailType": "Model Customization Job State Change",
             "Detail": json.dumps(detail), "Resources": [arn]}
    put_event(state.published, entry, state.region)


def put_event(published: list, entry: dict, region: str) -> None:
    """Records `entry` and puts it on the local EventBridge (moto) when there is one: best
    effort, as AWS's own events are."""
    published.append(entry)
    if os.environ.get("AWS_ENDPOINT_URL_EVENTBRIDGE") or os.environ.get("AWS_ENDPOINT_URL_EVENTS"):
        try:
            boto3.client("events", region_name=region).put_events(Entries=[entry])
        except Exception:  # noqa: BLE001 - EventBridge is best effort, as on AWS
            pass


def ticker(state: State) -> None:
    while True:
        time.sleep(0.05)
        with state.lock:
            jobs = [j for j in state.jobs.values() if j["status"] not in TERMINAL]
            clock = dict(state.clock)
        for job in jobs:
            try:
                _advance(state, job, clock)
            except Exception as exc:  # noqa: BLE001 - a broken job must not stop the clock
                with state.lock:
                    set_status(state, job, "failed", {"code": "internal", "message": str(exc), "param": None})


def _advance(state: State, job: dict, clock: dict) -> None:
    elapsed = time.monotonic() - job["_phase_at"]
    if job.get("_force_fail"):
        with state.lock:
            set_status(state, job, "failed", {"code": "training_failed",
                                               "message": job["_force_fail"].get("message"), "param": None})
        return
    if job["status"] == "validating_files" and elapsed >= clock["validating_seconds"]:
        rows = _rows(state, job["training_file"])
        with state.lock:
            if not 100 <= len(rows) <= 20000:
                set_status(state, job, "failed", {"code": "invalid_training_file", "param": "training_file",
                            "message": f"Training file has {len(rows)} valid rows; 100-20000 are required."})
            else:
                set_status(state, job, "queued")
    elif job["status"] == "queued" and elapsed >= clock["queued_seconds"]:
        with state.lock:
            set_status(state, job, "running")
    elif job["status"] == "running" and elapsed >= clock["step_seconds"] * (job["_step"] + 1):
        _train_step(state, job, clock)


def _rows(state: State, file_id: str) -> list[dict]:
    rows = []
    for line in state.file_bytes.get(file_id, b"").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            rows.append(row)
    return rows


def reference_text(ref: Any) -> str:
    if isinstance(ref, str):
        return ref
    if isinstance(ref, dict):
        for key in ("text", "answer", "final_answer", "solution"):
            if isinstance(ref.get(key), str):
                return ref[key]
        return json.dumps(ref)
    return ""


def _train_step(state: State, job: dict, clock: dict) -> None:
    step = job["_step"] + 1
    total = int(clock["total_steps"])
    rng = random.Random(f"{job['id']}:{step}")
    rows = _rows(state, job["training_file"])
    with state.lock:
        policy = state.policies.get(job["id"])
    if policy:
        samples = _policy_samples(job, clock, step, total, rng, rows, policy)
    else:
        quality = 0.15 + 0.8 * step / total  # the policy improves as it trains
        samples = []
        for i in range(int(clock["samples_per_step"])):
            row = rows[rng.randrange(len(rows))]
            answer = reference_text(row.get("reference_answer")) if rng.random() < quality else "I am not sure."
            sample = {k: v for k, v in row.items() if k not in ("messages", "id")}
            sample.update({"id": f"{job['id']}-s{step}-{i}",
                           "messages": row["messages"] + [{"role": "assistant", "content": answer}]})
            samples.append(sample)
    arn = job["method"]["reinforcement"]["grader"]["lambda"]["function"]
    scores, problem = invoke_grader(state, arn, samples)
    if problem:
        with state.lock:
            set_status(state, job, "failed", {"code": "reward_function_error", "param": None,
                                               "message": f"Reward function {arn} failed: {problem}"})
        return
    mean = sum(scores) / len(scores)
    lengths = [len(s["messages"][-1]["content"]) / 4 for s in samples]
    with state.lock:
        if job["status"] != "running":
            return  # cancelled meanwhile
        job["_step"] = step
        job["trained_tokens"] = (job.get("trained_tokens") or 0) + int(sum(lengths))
        add_event(state, job, f"Step {step}/{total}: training metrics", "metrics", {
            "step": step, "total_steps": total, "critic_rewards_mean": round(mean, 4),
            "critic_rewards_max": max(scores), "critic_rewards_min": min(scores),
            "actor_pg_loss": round(0.2 / step, 5), "actor_entropy": round(0.9 - 0.5 * step / total, 4),
            "actor_grad_norm": 0.001, "critic_advantages_mean": 0.01,
            "response_length_mean": round(sum(lengths) / len(lengths), 2)})
        if step % int(clock["checkpoint_every"]) == 0 or step == total:
            ck_id = "ftckpt-" + uuid.uuid4().hex[:20]
            state.checkpoints[job["id"]].append({
                "id": ck_id, "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
                "fine_tuned_model_checkpoint": f"{job['model']}:ft:{job['id'][6:18]}:ckpt-step-{step}",
                "fine_tuning_job_id": job["id"], "step_number": step,
                "metrics": {"step": step, "train_reward_mean": round(mean, 4)}})
            add_event(state, job, f"Checkpoint created at step {step}.")
        if step >= total:
            job["fine_tuned_model"] = f"{job['model']}:ft:{job['id'][6:18]}"
            set_status(state, job, "succeeded")




def call_policy(url: str, payload: dict, prompts: int, k: int) -> list[list[str]]:
    """POSTs to a policy URL; its {"responses": [[k texts] per prompt]}, checked."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read() or b"null")
    responses = answer.get("responses") if isinstance(answer, dict) else None
    if not (isinstance(responses, list) and len(responses) == prompts and all(
            isinstance(r, list) and len(r) == k and all(isinstance(t, str) for t in r) for r in responses)):
        raise ValueError(f"the policy must answer {{\"responses\": [[{k} texts] x {prompts} prompts]}}")
    return responses


def _policy_samples(job: dict, clock: dict, step: int, total: int, rng: random.Random, rows: list[dict],
                    url: str) -> list[dict]:
    """One step's rollouts from a replaceable policy: `samples_per_step // k` distinct prompts, k
    samples each. Bedrock "adds a unique id" per rollout (UNCONFIRMED which form): here each gets
    a suffixed id; the row's own fields (rft_prompt among them) go with it, as on Bedrock."""
    k = max(1, int(clock.get("samples_per_prompt", 4)))
    picked = rng.sample(range(len(rows)), min(len(rows), max(1, int(clock["samples_per_step"]) // k)))
    prompts = [{**{key: v for key, v in rows[r].items() if not key.startswith("rft_")},
                "id": str(rows[r].get("id") or f"row-{r}")} for r in picked]
    responses = call_policy(url, {"step": step, "total_steps": total, "prompts": prompts,
                                   "samples_per_prompt": k}, len(prompts), k)
    samples = []
    for j, (r, texts) in enumerate(zip(picked, responses)):
        for m, text in enumerate(texts):
            sample = {key: v for key, v in rows[r].items() if key not in ("messages", "id")}
            sample.update({"id": f"{job['id']}-s{step}-p{j}-{m}",
                           "messages": rows[r]["messages"] + [{"role": "assistant", "content": text}]})
            samples.append(sample)
    return samples


def invoke_grader(state: State, arn: str, samples: list[dict]) -> tuple[list[float], str | None]:
    """Calls the grader with Bedrock's reward contract; returns (scores, problem)."""
    client = boto3.client("lambda", region_name=state.region)
    try:
        resp = client.invoke(FunctionName=arn, Payload=json.dumps(samples).encode())
    except client.exceptions.ResourceNotFoundException:
        return [], "function not found"
    except Exception as exc:  # noqa: BLE001 - as Bedrock does: any invoke failure fails the step, named
        return [], f"invoke failed: {type(exc).__name__}"
    payload = resp["Payload"].read()
    if resp.get("FunctionError"):
        return [], f"function error: {payload[:300]!r}"
    try:
        out = json.loads(payload)
    except ValueError:
        return [], "response is not JSON"
    if not isinstance(out, list):
        return [], "response is not a list"
    by_id = {o.get("id"): o for o in out if isinstance(o, dict)}
    scores = []
    for sample in samples:
        item = by_id.get(sample["id"])
        if item is None:
            return [], f"no score for sample id {sample['id']}"
        score = item.get("aggregate_reward_score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            return [], f"aggregate_reward_score for {sample['id']} is not a finite number"
        scores.append(float(score))
    return scores, None
