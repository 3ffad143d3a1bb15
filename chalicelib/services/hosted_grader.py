"""rft-hub's hosted reward Lambda: runs declarative graders under Bedrock's reward contract.

One bad sample never fails the batch: it scores 0 with an error metric. Each sample has its
own time limit, counted from when it starts; the judge calls inside it are bounded by what is
left of the invocation, so no grading outlives it. Judge calls are the job's team's: metered on
the ledger with the job id and held to the team's budget. When the budget is spent, the sample
gets an error metric and the job is stopped with that reason (never silently trained on 0s).
Specs are cached per warm container (they are immutable, keyed by hash).
"""
from __future__ import annotations

import contextvars
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from chalicelib import deadline
from chalicelib.domain.graders import Deps, Grader, JudgeRefused, Result, build, run
from chalicelib.domain.graders.templates import make_sample
from chalicelib.log import logger
from chalicelib.services import graders

SAMPLE_TIME_LIMIT_S = 60.0
BATCH_MARGIN_MS = 3_000       # kept to return the scores after the last sample
WORKERS = 16                  # judge calls are I/O: graded in parallel, bounded
JOB_FIELD = "rft_job"         # "<team id>/<job id>", written into every training row with REF_FIELD
_cache: dict[str, Grader] = {}
_lock = threading.Lock()


def _grader(ref: str) -> Grader:
    with _lock:
        hit = _cache.get(ref)
    if hit is None:
        hit = build(graders.load_spec(ref))
        with _lock:
            _cache[ref] = hit
    return hit


def _samples(event: Any) -> list:
    if isinstance(event, list):
        return event
    if isinstance(event, dict):  # tolerated envelopes seen in AWS samples
        for key in ("trajectories", "batch", "samples"):
            if isinstance(event.get(key), list):
                return event[key]
    return []


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def split(sample: dict) -> tuple[str, dict]:
    """(response text, item) from a Bedrock sample: the response is the last non-user turn."""
    messages = sample.get("messages") if isinstance(sample.get("messages"), list) else []
    response = ""
    prompt = messages
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") not in ("user", "system"):
        response, prompt = _text(messages[-1].get("content")), messages[:-1]
    item = {k: v for k, v in sample.items() if k != "messages"}
    item["messages"] = prompt
    ref = item.get("reference_answer")
    if ref is None and isinstance(item.get("metadata"), dict):
        ref = item["metadata"].get("reference_answer")   # the contract's older shape
    if isinstance(ref, dict) and set(ref) == {"text"} and isinstance(ref["text"], str):
        ref = ref["text"]   # a string reference may arrive wrapped (UNCONFIRMED): unwrap it
    if ref is not None:
        item["reference_answer"] = ref
    return response, item


def _output(sample_id: str, result: Result) -> dict:
    metrics = [{"name": result.name, "value": result.reward, "type": "Reward"}]
    metrics += [{"name": f"{result.name}.{k}", "value": float(v), "type": "Metric"}
                for k, v in result.sub_rewards.items() if isinstance(v, (int, float))]
    metrics += [{"name": f"error.{kind}", "value": 1.0, "type": "Metric"} for kind in sorted(result.errors)]
    return {"id": sample_id, "aggregate_reward_score": result.reward, "metrics_list": metrics}


def _failed(sample_id: str, kind: str, detail: str) -> dict:
    return _output(sample_id, Result(0.0, "rft_hub", "error", {kind}, detail))


def job_of(sample: dict) -> tuple[str, str] | None:
    team_id, _, job_id = str(sample.get(JOB_FIELD) or "").partition("/")
    return (team_id, job_id) if team_id and job_id else None


def grade_one(sample: Any, spent: dict | None = None, refused: set | None = None) -> dict:
    sample_id = str(sample.get("id")) if isinstance(sample, dict) else "unknown"
    if not isinstance(sample, dict):
        return _failed(sample_id, "sample_parse_error", "sample is not an object")
    try:
        grader = _grader(sample.get(graders.REF_FIELD))
    except Exception:  # noqa: BLE001
        return _failed(sample_id, "other_error", f"no grader for {graders.REF_FIELD}={sample.get(graders.REF_FIELD)!r}")
    owner = job_of(sample)
    if owner is None:
        deps = Deps()          # no team to bill: judge calls are graded as errors
    else:
        costs = spent.setdefault(owner, []) if spent is not None else None
        deps = graders.deps(owner[0], job_id=owner[1], spent=costs)
    response, item = split(sample)
    try:
        return _output(sample_id, run(grader, make_sample(response), item, deps))
    except JudgeRefused as exc:
        if refused is not None and owner is not None:
            refused.add(owner)
        return _failed(sample_id, "budget_exhausted", str(exc)[:300])


def handle(event: Any, context: Any = None) -> list[dict]:
    samples = _samples(event)
    started = time.monotonic()
    usable = deadline.budget_from_context(context, cap=900.0) if context is not None else SAMPLE_TIME_LIMIT_S
    usable = max(1.0, usable - BATCH_MARGIN_MS / 1000)
    spent: dict = defaultdict(list)
    refused: set = set()
    began: dict[int, float] = {}
    with deadline.running(usable):
        pool = ThreadPoolExecutor(max_workers=WORKERS)

        def work(i: int, sample: Any) -> dict:
            began[i] = time.monotonic()
            return grade_one(sample, spent, refused)

        # Each worker runs in a copy of this context: its judge calls see the invocation's deadline.
        futures = [pool.submit(contextvars.copy_context().run, work, i, s) for i, s in enumerate(samples)]
        try:
            while True:
                now = time.monotonic()
                # Still worth waiting for: not done, and not past its own limit (counted from its start).
                live = [f for i, f in enumerate(futures)
                        if not f.done() and (i not in began or now - began[i] <= SAMPLE_TIME_LIMIT_S)]
                if not live or now - started >= usable:
                    break
                limits = [began[i] + SAMPLE_TIME_LIMIT_S for i, f in enumerate(futures)
                          if not f.done() and i in began]
                wait(live, timeout=max(0.01, min([started + usable] + limits) - now), return_when="FIRST_COMPLETED")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    out = []
    for i, (sample, future) in enumerate(zip(samples, futures)):
        sample_id = str(sample.get("id")) if isinstance(sample, dict) else "unknown"
        if future.done() and not future.cancelled():
            try:
                out.append(future.result())
            except Exception:  # noqa: BLE001 - grade_one never raises; this is belt and braces
                out.append(_failed(sample_id, "other_error", "grading failed"))
        elif i in began:
            out.append(_failed(sample_id, "unresponsive_reward_error", "sample exceeded its time limit"))
        else:
            out.append(_failed(sample_id, "unresponsive_reward_error", "the invocation ran out of time before "
                                                                        "this sample started"))
    try:
        _account(spent, refused)
    except Exception:  # noqa: BLE001 - the scores must reach Bedrock; each judge call is on the ledger anyway
        logger.exception("judge accounting failed", extra={"jobs": [f"{t}/{j}" for t, j in spent]})
    logger.info("graded batch", extra={"samples": len(samples), "seconds": round(time.monotonic() - started, 3)})
    return out


def _account(spent: dict, refused: set) -> None:
    """One write per job per invocation: the judge cost on the job, and a stop when refused."""
    from chalicelib.services import jobs   # only the hosted grader's training path needs the jobs service

    for (team_id, job_id), costs in spent.items():
        if costs:
            jobs.add_judge_cost(team_id, job_id, sum(costs))
    for team_id, job_id in refused:
        jobs.request_stop(team_id, job_id, "budget_exhausted",
                          "The team's budget ran out during training, so the grader's judge calls were refused; "
                          "rft-hub stopped the job rather than train on zero rewards.")
