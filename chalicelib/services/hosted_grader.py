"""rft-hub's hosted reward Lambda: runs declarative graders under Bedrock's reward contract.

One bad sample never fails the batch: it scores 0 with an error metric. Every sample has
a time limit. Specs are cached per warm container (they are immutable, keyed by hash).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import Any

from chalicelib.domain.graders import Grader, Result, build, run
from chalicelib.domain.graders.templates import make_sample
from chalicelib.log import logger
from chalicelib.services import graders

SAMPLE_TIME_LIMIT_S = 60.0
BATCH_MARGIN_MS = 10_000
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


def grade_one(sample: Any) -> dict:
    sample_id = str(sample.get("id")) if isinstance(sample, dict) else "unknown"
    if not isinstance(sample, dict):
        return _failed(sample_id, "sample_parse_error", "sample is not an object")
    try:
        grader = _grader(sample.get(graders.REF_FIELD))
    except Exception:  # noqa: BLE001
        return _failed(sample_id, "other_error", f"no grader for {graders.REF_FIELD}={sample.get(graders.REF_FIELD)!r}")
    response, item = split(sample)
    return _output(sample_id, run(grader, make_sample(response), item, graders.deps()))


def handle(event: Any, context: Any = None) -> list[dict]:
    samples = _samples(event)
    started = time.monotonic()
    budget_s = SAMPLE_TIME_LIMIT_S
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        budget_s = min(budget_s, max(1.0, (context.get_remaining_time_in_millis() - BATCH_MARGIN_MS) / 1000))
    out: list[dict] = []
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        futures = [(s, pool.submit(grade_one, s)) for s in samples]
        for sample, future in futures:
            sample_id = str(sample.get("id")) if isinstance(sample, dict) else "unknown"
            remaining = budget_s - (time.monotonic() - started)
            try:
                out.append(future.result(timeout=max(0.01, remaining)))
            except FutureTimeout:
                out.append(_failed(sample_id, "unresponsive_reward_error", "sample exceeded its time limit"))
            except Exception:  # noqa: BLE001 - grade_one never raises; this is belt and braces
                out.append(_failed(sample_id, "other_error", "grading failed"))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    logger.info("graded batch", extra={"samples": len(samples), "seconds": round(time.monotonic() - started, 3)})
    return out
