"""Rollouts, kept and browsable: what the hosted grader saw in every reward invocation.

Per invocation and job (the hosted grader calls `record` after grading):

* every sample's reward, errors, response length and text fingerprint, and the full text of a
  bounded sample (the 3 best, the 3 worst and 2 at random), as one gzip JSONL object in the
  datasets bucket: `rollouts/<team>/<job>/<invocation>.jsonl.gz` (one line per sample);
* the invocation's additive statistics ADDed to its window's item (`RolloutWindow`): one
  UpdateItem, no read, any order, so concurrent invocations never conflict;
* one `Rollout` item per kept sample (indexed by reward and in a fixed random order), which the
  rollouts endpoint pages through with the one pagination helper.

A window is `per_window` consecutive invocations of the job (default 1:
RFT_WATCH_INVOCATIONS_PER_WINDOW), numbered from 1 in the order the invocations were counted (one
atomic counter per job). The watch view labels windows with Bedrock's training steps where the
metrics events allow (domain/watch.py `align_steps`).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pynamodb.exceptions import DoesNotExist

from chalicelib.adapters import aws
from chalicelib.config import settings
from chalicelib.domain import watch as rules
from chalicelib.errors import InvalidRequest
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import Job, Rollout, RolloutWindow

MAX_TEXT_CHARS = 100_000          # a kept response's text (longer ones are cut, and say so)
MAX_PROMPT_CHARS = 4_000
RETENTION = timedelta(days=90)    # Rollout items (the S3 objects follow the bucket's own rules)
ORDERS = {"reward_desc": "by_reward", "reward_asc": "by_reward", "random": "by_random"}
CONFIG_TTL_S = 60.0               # how long a warm container trusts "this job does not exist"

_configs: dict[tuple[str, str], tuple[float, rules.Config | None]] = {}
_lock = threading.Lock()


def job_key(team_id: str, job_id: str) -> str:
    return f"{team_id}#{job_id}"


def summary_key(team_id: str, job_id: str) -> str:
    return f"{job_key(team_id, job_id)}#summary"


def window_key(team_id: str, job_id: str, window: int) -> str:
    return f"{job_key(team_id, job_id)}#{window:08d}"


def default_per_window() -> int:
    try:
        return max(1, int(os.environ.get("RFT_WATCH_INVOCATIONS_PER_WINDOW", "1")))
    except ValueError:
        return 1


# ---- a job's watch settings ---------------------------------------------------------------------

def configure(team_id: str, job_id: str, on_critical: str, audit_ref: str | None) -> None:
    """Written once when the job is created (a replay finds it there)."""
    item = RolloutWindow(summary_key(team_id, job_id), 0, on_critical=on_critical, audit_ref=audit_ref,
                         per_window=default_per_window(), invocations=0)
    dynamo.put_once(item, RolloutWindow.job_key, "watch settings")


def config(team_id: str, job_id: str) -> rules.Config | None:
    """The job's watch settings (cached per warm container: they never change), or None when no such
    job exists (rows graded outside a job record nothing). A job created before the watch existed
    gets the defaults."""
    key = (team_id, job_id)
    with _lock:
        hit = _configs.get(key)
    if hit is not None and (hit[1] is not None or time.monotonic() - hit[0] < CONFIG_TTL_S):
        return hit[1]
    try:
        item = RolloutWindow.get(summary_key(team_id, job_id), 0)
        found: rules.Config | None = rules.Config(item.on_critical or "alert", item.audit_ref,
                                                  int(item.per_window or default_per_window()))
    except DoesNotExist:
        try:
            Job.get(team_id, job_id)
            found = rules.Config(per_window=default_per_window())
        except DoesNotExist:
            found = None
    with _lock:
        if len(_configs) > 10_000:
            _configs.clear()
        _configs[key] = (time.monotonic(), found)
    return found


def latest_window(team_id: str, job_id: str) -> int:
    """The newest window with rollouts (0: none yet)."""
    try:
        item = RolloutWindow.get(summary_key(team_id, job_id), 0, consistent_read=True)
    except DoesNotExist:
        return 0
    count = int(item.invocations or 0)
    per = int(item.per_window or default_per_window())
    return (count - 1) // per + 1 if count else 0


# ---- recording an invocation --------------------------------------------------------------------

@dataclass
class Graded:
    """One graded sample of an invocation, as the hosted grader saw it."""
    index: int                     # its position in the invocation
    owner: tuple[str, str]         # (team id, job id)
    sample: rules.Sample
    response: str
    prompt_text: str
    reference: Any


def _next_invocation(team_id: str, job_id: str) -> int:
    counter = RolloutWindow(summary_key(team_id, job_id), 0)
    dynamo.call(lambda: counter.update(actions=[RolloutWindow.invocations.add(1)]), idempotent=False,
                what="rollout counter")
    return int(counter.invocations)


def _line(g: Graded, kept: str | None) -> dict:
    s = g.sample
    line = {"id": s.id, "prompt": s.prompt, "reward": s.reward, "errors": list(s.errors), "length": s.length,
            "fingerprint": s.fingerprint, "degenerate": s.degenerate, "audit": s.audit, "kept": kept}
    if kept:
        line["response"] = g.response[:MAX_TEXT_CHARS]
        line["truncated"] = len(g.response) > MAX_TEXT_CHARS
        line["prompt_text"] = g.prompt_text[:MAX_PROMPT_CHARS]
        line["reference"] = g.reference if len(json.dumps(g.reference, default=str)) <= MAX_PROMPT_CHARS else None
    return line


def _add_window(team_id: str, job_id: str, window: int, stats: dict, now_ms: int) -> None:
    actions = [getattr(RolloutWindow, name).add(value) for name, value in stats.items() if value]
    actions += [RolloutWindow.invocations.add(1), RolloutWindow.first_at.set(RolloutWindow.first_at | now_ms),
                RolloutWindow.last_at.set(now_ms)]
    item = RolloutWindow(job_key(team_id, job_id), window)
    # ADD is not idempotent: an unknown outcome is not repeated (the window may miss one invocation).
    dynamo.call(lambda: item.update(actions=actions), idempotent=False, what="rollout window")


def record(graded: list[Graded], now_ms: int | None = None) -> list[tuple[tuple[str, str], rules.Config, int]]:
    """Records one invocation's samples, per job. Returns (owner, settings, window) per job recorded."""
    now_ms = now_ms or int(time.time() * 1000)
    by_job: dict[tuple[str, str], list[Graded]] = {}
    for g in graded:
        by_job.setdefault(g.owner, []).append(g)
    touched = []
    for (team_id, job_id), items in by_job.items():
        cfg = config(team_id, job_id)
        if cfg is None:
            continue
        seq = _next_invocation(team_id, job_id)
        window = (seq - 1) // max(1, cfg.per_window) + 1
        invocation = f"i{seq:07d}"
        samples = [g.sample for g in items]
        kept = rules.choose_kept(samples, random.Random(f"{team_id}/{job_id}/{seq}"))
        s3_key = f"rollouts/{team_id}/{job_id}/{invocation}.jsonl.gz"
        body = "".join(json.dumps(_line(g, kept.get(i)), separators=(",", ":"), default=str) + "\n"
                       for i, g in enumerate(items))
        aws.s3().put_object(Bucket=settings().datasets_bucket, Key=s3_key, Body=gzip.compress(body.encode()),
                            ContentType="application/gzip")
        wkey = window_key(team_id, job_id, window)
        records = []
        for i, why in kept.items():
            s = items[i].sample
            rollout_id = f"{invocation}.{items[i].index:05d}"
            digest = hashlib.sha256(f"{wkey}/{rollout_id}".encode()).hexdigest()[:16]
            records.append(Rollout(wkey, rollout_id, reward_key=f"{rules.sortable(s.reward)}#{rollout_id}",
                                   random_key=f"{digest}#{rollout_id}", window=window, invocation=invocation,
                                   sample_id=s.id[:512], prompt_key=s.prompt[:512], reward=s.reward,
                                   errors=list(s.errors), response_length=s.length, fingerprint=s.fingerprint,
                                   degenerate=s.degenerate, audit_score=s.audit, kept=why, s3_key=s3_key, line=i,
                                   created_at=now_ms // 1000, expires_at=RETENTION))

        def save(records=records):
            with Rollout.batch_write() as batch:
                for r in records:
                    batch.save(r)
        dynamo.call(save, idempotent=True, what="rollouts")
        _add_window(team_id, job_id, window, rules.invocation_stats(samples), now_ms)
        touched.append(((team_id, job_id), cfg, window))
    return touched


# ---- browsing ---------------------------------------------------------------------------------

def _texts(keys: set[str]) -> dict[str, list[dict]]:
    out = {}
    for key in keys:
        try:
            raw = aws.s3().get_object(Bucket=settings().datasets_bucket, Key=key)["Body"].read()
            out[key] = [json.loads(line) for line in gzip.decompress(raw).decode().splitlines() if line.strip()]
        except Exception:  # noqa: BLE001 - a missing object shows the rollout without its text
            out[key] = []
    return out


def rollout_view(r: Rollout, line: dict | None) -> dict:
    line = line or {}
    return {"id": r.rollout_id, "object": "fine_tuning.job.rollout", "window": int(r.window),
            "invocation": r.invocation, "sample_id": r.sample_id, "prompt_key": r.prompt_key,
            "reward": float(r.reward), "errors": list(r.errors or []), "response_length": int(r.response_length),
            "fingerprint": r.fingerprint, "degenerate": bool(r.degenerate),
            "audit_score": None if r.audit_score is None else float(r.audit_score), "kept": r.kept,
            "created_at": int(r.created_at), "prompt": line.get("prompt_text"),
            "reference_answer": line.get("reference"), "response": line.get("response"),
            "truncated": bool(line.get("truncated"))}


def list_rollouts(team_id: str, job_id: str, window: int | None, order: str, limit: int,
                  after: str | None) -> dict:
    from chalicelib.training import record as job_record  # the API's path only

    job_record.get_job(team_id, job_id)          # another team's job is a 404
    if order not in ORDERS:
        raise InvalidRequest(f"order must be one of {', '.join(ORDERS)}.", param="order")
    index = ORDERS[order]
    if window is None:
        window = latest_window(team_id, job_id)
    empty = pagination.envelope([], window=window or None, order=order)
    if not window:
        return empty
    wkey = window_key(team_id, job_id, window)
    start = None
    if pagination.is_cursor(after):
        start = pagination.decode_cursor(after, Rollout, hash_value=wkey, index=index)
    elif after:
        if len(after.encode()) > 1024:
            return empty
        try:
            anchor = dynamo.call(lambda: Rollout.get(wkey, after), idempotent=True, what="rollouts")
        except DoesNotExist:
            return empty
        start = pagination.start_key(Rollout, anchor, index)
    page = pagination.query(Rollout, wkey, index=index, newest_first=order == "reward_desc", limit=limit,
                            start=start, what="rollouts")
    texts = _texts({r.s3_key for r in page.items})
    data = []
    for r in page.items:
        lines = texts.get(r.s3_key) or []
        data.append(rollout_view(r, lines[int(r.line)] if int(r.line) < len(lines) else None))
    return pagination.envelope(data, page, window=window or None, order=order)
