"""Grader preflight on a team's own dataset (POST /v1/graders/preflight, and at job creation).

Adversarial probes on sampled rows (domain/graders/preflight.py), and optionally the learning
signal measured on the base model: k responses per sampled prompt through the gateway (metered to
the team like any call, capped by `max_usd`), graded by the grader.
"""
from __future__ import annotations

import contextvars
import json
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from chalicelib import deadline
from chalicelib.config import settings
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import datasets, ids, pricing
from chalicelib.domain.graders import Grader, JudgeRefused, run_text
from chalicelib.domain.graders.core import LambdaGrader, Result
from chalicelib.domain.graders.preflight import CRITICAL, PROBES, base_findings, base_stats, findings, others_for, stats
from chalicelib.domain.graders.preflight import context as probe_context
from chalicelib.domain.graders.templates import make_sample
from chalicelib.errors import ApiError, InvalidRequest
from chalicelib.grading import graders
from chalicelib.inference import gateway, targets
from chalicelib.platform import files
from chalicelib.platform.teams import Principal

LAMBDA_BATCH = 100
BASE_PARAM = "sample_base"
BASE_WORKERS = 8
BASE_STOP_SECONDS = 6.0     # no new base-model call when the request has less time left than this


def sample_rows(team_id: str, file_id: str, n: int, seed: int = 0) -> list[dict]:
    """Reservoir sample of n rows, streamed (the file is never held whole)."""
    rng = random.Random(seed)
    chosen: list[dict] = []
    for i, line in enumerate(datasets.iter_lines(files.open_content(files.get_file(team_id, file_id)))):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if len(chosen) < n:
            chosen.append(row)
        else:
            j = rng.randint(0, i)
            if j < n:
                chosen[j] = row
    return chosen


def _grade_all(grader: Grader, pairs: list[tuple[str, str, dict]], deps) -> list[tuple[str, Result]]:
    if isinstance(grader, LambdaGrader):
        out = []
        for start in range(0, len(pairs), LAMBDA_BATCH):
            chunk = pairs[start:start + LAMBDA_BATCH]
            results = grader.grade_batch([(make_sample(text), item) for _, text, item in chunk], deps)
            out += [(probe, r) for (probe, _, _), r in zip(chunk, results)]
        return out
    with ThreadPoolExecutor(max_workers=8) as pool:   # judge calls overlap
        results = pool.map(lambda p: run_text(grader, p[1], p[2], deps)[0], pairs)
        return [(probe, r) for (probe, _, _), r in zip(pairs, results)]


def run(team_id: str, spec: dict, file_id: str, sample_size: int, key_id: str | None = None,
        sample_base: dict | None = None, allowed=None) -> dict:
    """Judge calls are the team's (metered, held to its budget); out of budget is the 429."""
    grader = graders.compile_spec(spec, team_id=team_id, allowed=allowed)
    base_plan = _base_plan(team_id, sample_base, allowed) if sample_base is not None else None   # checked before any call
    rows = sample_rows(team_id, file_id, sample_size)
    items = [{**row, "id": str(row.get("id") or f"row-{i}")} for i, row in enumerate(rows)]
    pairs = []
    for item, others in zip(items, others_for(items)):
        ctx = probe_context(spec, others)    # output_json graders get probes as JSON (issue #24)
        for probe, make in PROBES.items():
            text = make(item, ctx)
            if text is not None:          # e.g. no other row to borrow a wrong answer from
                pairs.append((probe, text, item))
    deps = graders.deps(team_id, key_id=key_id)
    try:
        graded = _grade_all(grader, pairs, deps)
    except JudgeRefused as refused:
        raise refused.error from None
    by_probe: dict[str, list[Result]] = {p: [] for p in PROBES}
    for probe, result in graded:
        by_probe[probe].append(result)
    error_kinds = Counter(kind for _, r in graded for kind in r.errors)
    probe_stats = {p: stats([r.reward for r in rs if not r.errors], sum(1 for r in rs if r.errors))
                   for p, rs in by_probe.items()}
    found = findings(probe_stats, dict(error_kinds), len(graded))
    report = {"object": "grader.preflight", "grader": {"name": grader.name, "type": grader.type},
              "file_id": file_id, "sample_size": sample_size, "rows_used": len(rows), "probes": probe_stats,
              "findings": found}
    if base_plan is not None:
        report["base"] = _sample_base(team_id, key_id, grader, items, base_plan, deps,
                                      probe_stats["reference"]["mean"])
        found += base_findings(report["base"])
    report["passed"] = not any(f["severity"] == CRITICAL for f in found)
    return report


def _text(reply_body: bytes) -> str:
    try:
        message = json.loads(reply_body)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return message.get("content") or "" if isinstance(message, dict) else ""


def check_base_plan(team_id: str, options: dict, allowed=None) -> None:
    """Refuses (400 naming `sample_base.<field>`) base-model sampling settings before any call."""
    _base_plan(team_id, options, allowed)


def _base_plan(team_id: str, options: dict, allowed=None) -> dict:
    """The base-model sampling's settings, checked (model priced for the team, the cap an amount)."""

    model = options.get("model") or settings().rft_models[0]
    try:
        cap = budget_rules.to_micro(options.get("max_usd") or "1.00", maximum_micro=10_000 * 1_000_000)
    except ValueError as exc:
        raise InvalidRequest(f"{BASE_PARAM}.max_usd {exc}.", param=f"{BASE_PARAM}.max_usd") from None
    _, price = targets.priced(team_id, model, f"{BASE_PARAM}.model", allowed=allowed)
    return {**options, "model": model, "cap": cap, "price": price}


def _sample_base(team_id: str, key_id: str | None, grader: Grader, items: list[dict], options: dict, deps,
                 reference_mean: float | None) -> dict:
    """k base-model responses per sampled prompt, graded: the reward floor, the share of prompts whose
    k samples all score the same, and the headroom. Every call goes through the gateway (metered to
    the team, held to its budget: out of budget is the 429); the sampling stops before `max_usd`
    could be passed (each call counts at its worst case until its real cost is known), and before
    the request runs out of time."""

    model, cap, price = options["model"], options["cap"], options["price"]
    k = int(options.get("k") or 4)
    max_tokens = int(options.get("max_tokens") or 512)
    prompts = items[: int(options.get("prompts") or min(len(items), 8))]
    principal = Principal(team_id, key_id)
    lock = threading.Lock()
    ledger = {"committed": 0, "spent": 0, "calls": 0, "capped": 0, "errors": 0, "late": 0}

    def one(p: int) -> tuple[int, str | None]:
        messages = [m for m in prompts[p].get("messages") or [] if isinstance(m, dict)]
        worst = budget_rules.worst_case_micro(price, budget_rules.prompt_tokens_estimate(messages), max_tokens)
        with lock:
            if deadline.remaining() < BASE_STOP_SECONDS:
                ledger["late"] += 1
                return p, None
            if ledger["committed"] + worst > cap:
                ledger["capped"] += 1
                return p, None
            ledger["committed"] += worst
        cost = 0
        try:
            reply = gateway.chat_completions(principal, ids.new_id("pfbase", 8), {
                "model": model, "messages": messages, "max_tokens": max_tokens})
            cost = budget_rules.to_micro(reply.headers.get("x-rft-cost-usd") or "0")
            text = _text(reply.body) if reply.status == 200 else None
        except ApiError as err:
            if err.code == "insufficient_quota":
                with lock:
                    ledger["committed"] -= worst
                raise
            text = None
        with lock:
            ledger["committed"] += cost - worst
            ledger["spent"] += cost
            ledger["calls"] += 1
            ledger["errors"] += text is None
        return p, text

    with ThreadPoolExecutor(max_workers=BASE_WORKERS) as pool:
        # Each call in a copy of this context: it sees the request's deadline (gateway, judge).
        futures = [pool.submit(contextvars.copy_context().run, one, p) for p in range(len(prompts)) for _ in range(k)]
        answers = [f.result() for f in futures]
    pairs = [("base", text, prompts[p]) for p, text in answers if text is not None]
    owners = [p for p, text in answers if text is not None]
    try:
        graded = _grade_all(grader, pairs, deps)
    except JudgeRefused as refused:
        raise refused.error from None
    scores: list[list[float]] = [[] for _ in prompts]
    grading_errors = 0
    for p, (_, result) in zip(owners, graded):
        if result.errors:
            grading_errors += 1
        else:
            scores[p].append(result.reward)

    return {"model": model, "k": k, "max_tokens": max_tokens, "max_usd": pricing.usd(cap),
            "spent_usd": pricing.usd(ledger["spent"]), "calls": ledger["calls"], "call_errors": ledger["errors"],
            "grading_errors": grading_errors, "skipped_for_cap": ledger["capped"],
            "skipped_for_time": ledger["late"], **base_stats(scores, reference_mean)}
