"""rft-hub's hosted reward Lambda: every reward of every job goes through it (Bedrock is always
given this function). It runs declarative graders under Bedrock's reward contract, and a team's
own Lambda grader behind the same contract; then it records the rollouts and runs the watch.

One bad sample never fails the batch: it scores 0 with an error metric. Each sample has its
own time limit, counted from when it starts; the judge calls inside it are bounded by what is
left of the invocation, so no grading outlives it. Judge calls are the job's team's: metered on
the ledger with the job id and held to the team's budget. When the budget is spent, the sample
gets an error metric and the job is stopped with that reason (never silently trained on 0s).
Specs are cached per warm container (they are immutable, keyed by hash).

A team's Lambda grader (a spec of type `lambda`) gets the rows exactly as Bedrock sent them,
without rft-hub's own fields (`rft_grader_ref`, `rft_job`, `rft_prompt`), in invocations under
Lambda's 6 MB request limit, and each answer is checked with the reward contract; its scores and
metrics are returned unchanged. A contract violation, a function error or a timeout scores the
invocation's samples 0 with `error.lambda_contract_error` / `error.lambda_error` /
`error.lambda_timeout` (counted by the watch: "grader_errors").

When a job names an audit grader (`method.reinforcement.audit_grader`), random samples of each
invocation are also scored by it (`audit_per_invocation()`: RFT_WATCH_AUDIT_PER_INVOCATION, default
32, capped at AUDIT_MAX; its judge calls metered to the job like every judge), alongside the
grading; the audit never delays the scores by more than AUDIT_GRACE_S after the grading is done.
32 rather than 8: the audit divergence rule tests the gap's change against its standard error,
and 0/1 scores on 8 a side are mostly noise (issue #24).
"""
from __future__ import annotations

import contextvars
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from chalicelib import deadline
from chalicelib.adapters import lambdas
from chalicelib.config import settings
from chalicelib.domain import watch as rules
from chalicelib.domain.graders import Deps, Grader, JudgeRefused, Result, build, run
from chalicelib.domain.graders.contract import check_response, size_batches
from chalicelib.domain.graders.core import LambdaGrader
from chalicelib.domain.graders.rows import JOB_FIELD, OWN_FIELDS, REF_FIELD
from chalicelib.domain.graders.templates import make_sample
from chalicelib.grading import graders
from chalicelib.log import logger
from chalicelib.store.models import Job
from chalicelib.training import rollouts, watch

SAMPLE_TIME_LIMIT_S = 60.0
LAMBDA_TIME_LIMIT_S = lambdas.LAMBDA_TIMEOUT_S + 5.0   # one invocation of a team's Lambda
BATCH_MARGIN_MS = 3_000       # kept to return the scores after the last sample
WORKERS = 16                  # judge calls are I/O: graded in parallel, bounded
AUDIT_PER_INVOCATION = 32     # samples per job and invocation scored by its audit grader (default)
AUDIT_MAX = 64                # ... at most (each audit may be a metered judge call)
AUDIT_GRACE_S = 5.0           # the longest the scores wait for audits once the grading is done
RECORD_MIN_S = 0.5            # less time left than this after grading: the rollouts are not recorded
_cache: dict[str, Grader] = {}
_lock = threading.Lock()


def audit_per_invocation() -> int:
    """How many samples per job and invocation the audit grader scores (RFT_WATCH_AUDIT_PER_INVOCATION)."""
    try:
        wanted = int(os.environ.get("RFT_WATCH_AUDIT_PER_INVOCATION", AUDIT_PER_INVOCATION))
    except ValueError:
        wanted = AUDIT_PER_INVOCATION
    return max(1, min(AUDIT_MAX, wanted))


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


def grade_one(sample: Any, spent: dict | None = None, refused: set | None = None,
              grader: Grader | None = None) -> dict:
    sample_id = str(sample.get("id")) if isinstance(sample, dict) else "unknown"
    if not isinstance(sample, dict):
        return _failed(sample_id, "sample_parse_error", "sample is not an object")
    try:
        grader = grader or _grader(sample.get(REF_FIELD))
    except Exception:  # noqa: BLE001 - any failure to load the grader is this sample's error, never the batch's
        return _failed(sample_id, "other_error", f"no grader for {REF_FIELD}={sample.get(REF_FIELD)!r}")
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


# ---- a team's own Lambda grader, behind rft-hub -------------------------------------------------

def team_rows(samples: list[dict]) -> list[dict]:
    """The rows a team's Lambda gets: as Bedrock sent them, without rft-hub's own fields."""
    return [{k: v for k, v in s.items() if k not in OWN_FIELDS} for s in samples]


def lambda_batches(rows: list[dict]) -> tuple[list[list[int]], list[int]]:
    """Row indexes grouped into invocations: each fits Lambda's 6 MB request limit and holds every
    id at most once (whether Bedrock repeats a row's id across its k rollouts is UNCONFIRMED: a
    repeated id goes to another invocation, so each answer is matched to its row by id), and the
    rows too large to send at all."""
    rounds: list[list[int]] = []
    seen: list[set] = []
    for i, row in enumerate(rows):
        for members, ids_ in zip(rounds, seen):
            if row["id"] not in ids_:
                members.append(i)
                ids_.add(row["id"])
                break
        else:
            rounds.append([i])
            seen.append({row["id"]})
    batches, too_large = [], []
    for members in rounds:
        groups, large = size_batches([rows[i] for i in members])
        batches += [[members[j] for j in group] for group in groups]
        too_large += [members[j] for j in large]
    return batches, too_large


def invoke_team_lambda(grader: LambdaGrader, rows: list[dict], deps: Deps) -> list[dict]:
    """One invocation of the team's Lambda: its answers (checked), or every row scored 0 with the
    error. Each answer keeps the team's score and metrics exactly."""
    def failed(kind: str, detail: str) -> list[dict]:
        return [_failed(r["id"], kind, detail) for r in rows]
    try:
        response = deps.invoke_lambda(grader.arn, rows)
    except TimeoutError as exc:
        return failed("lambda_timeout", str(exc)[:300] or "the Lambda timed out")
    except Exception as exc:  # noqa: BLE001 - reported as the Lambda's error
        return failed("lambda_error", str(exc)[:300])
    scores, problems = check_response(rows, response)
    if problems:
        return failed("lambda_contract_error", "; ".join(problems[:5])[:1000])
    by_id = {item["id"]: item for item in response}
    return [{"id": r["id"], "aggregate_reward_score": score, "metrics_list": by_id[r["id"]].get("metrics_list", [])}
            for r, score in zip(rows, scores)]


def _resolve(sample: Any) -> Grader | None:
    if not isinstance(sample, dict):
        return None
    try:
        return _grader(sample.get(REF_FIELD))
    except Exception:  # noqa: BLE001 - graded (as an error) by grade_one
        return None


# ---- one invocation ---------------------------------------------------------------------------

class _Task:
    def __init__(self, kind: str, indexes: list[int], limit: float, fn: Callable[[], Any]) -> None:
        self.kind, self.indexes, self.limit, self.fn = kind, indexes, limit, fn


def _plan(samples: list, spent: dict, refused: set) -> list[_Task]:
    tasks: list[_Task] = []
    by_lambda: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        grader = _resolve(sample)
        if isinstance(grader, LambdaGrader) and isinstance(sample.get("id"), str):
            by_lambda[sample[REF_FIELD]].append(i)
        else:
            tasks.append(_Task("sample", [i], SAMPLE_TIME_LIMIT_S,
                               lambda s=sample, g=grader: [grade_one(s, spent, refused, g)]))
    deps = Deps(invoke_lambda=lambdas.invoke)
    for ref, indexes in by_lambda.items():
        grader = _grader(ref)
        rows = team_rows([samples[i] for i in indexes])
        batches, too_large = lambda_batches(rows)
        for j in too_large:
            tasks.append(_Task("sample", [indexes[j]], SAMPLE_TIME_LIMIT_S, lambda r=rows[j]: [_failed(
                r["id"], "lambda_error", "the sample is larger than a Lambda invocation takes (6 MB)")]))
        for batch in batches:
            chunk = [rows[j] for j in batch]
            tasks.append(_Task("lambda", [indexes[j] for j in batch], LAMBDA_TIME_LIMIT_S,
                               lambda g=grader, c=chunk: invoke_team_lambda(g, c, deps)))
    return tasks


def _plan_audits(samples: list, spent: dict) -> list[_Task]:
    """A few random samples per job with an audit grader, scored by it (metered to the job)."""

    by_job: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        owner = job_of(sample) if isinstance(sample, dict) else None
        if owner is not None:
            by_job[owner].append(i)
    tasks = []
    for owner, indexes in by_job.items():
        try:
            cfg = rollouts.config(*owner)
            audit = _grader(cfg.audit_ref) if cfg is not None and cfg.audit_ref else None
        except Exception:  # noqa: BLE001 - the grading must not depend on the watch
            logger.warning("audit grader unavailable", extra={"job_id": owner[1]})
            continue
        if audit is None:
            continue
        deps = graders.deps(owner[0], job_id=owner[1], spent=spent.setdefault(owner, []))
        for i in random.sample(indexes, min(audit_per_invocation(), len(indexes))):
            def audit_one(sample=samples[i], grader=audit, deps=deps):
                response, item = split(sample)
                try:
                    result = run(grader, make_sample(response), item, deps)
                except JudgeRefused:
                    return [None]          # the budget is spent: no audit (the grading decides the stop)
                return [None if result.errors else result.reward]
            tasks.append(_Task("audit", [i], SAMPLE_TIME_LIMIT_S, audit_one))
    return tasks


def _run(tasks: list[_Task], started: float, usable: float) -> tuple[list, dict[int, float]]:
    """Runs the tasks in parallel within `usable` seconds; (futures, task index -> start time)."""
    began: dict[int, float] = {}
    pool = ThreadPoolExecutor(max_workers=WORKERS)

    def work(t: int, task: _Task):
        began[t] = time.monotonic()
        return task.fn()

    # Each worker runs in a copy of this context: its judge calls see the invocation's deadline.
    futures = [pool.submit(contextvars.copy_context().run, work, t, task) for t, task in enumerate(tasks)]
    graded_at = None
    try:
        while True:
            now = time.monotonic()

            def live(kind_is_audit: bool, now: float = now) -> list:
                # Still worth waiting for: not done, and not past its own limit (counted from its start).
                return [f for t, f in enumerate(futures) if (tasks[t].kind == "audit") == kind_is_audit
                        and not f.done() and (t not in began or now - began[t] <= tasks[t].limit)]
            grading, audits = live(False), live(True)
            if not grading:
                graded_at = graded_at or now
                if not audits or now - graded_at >= AUDIT_GRACE_S:
                    break
            if now - started >= usable:
                break
            limits = [began[t] + tasks[t].limit for t, f in enumerate(futures) if not f.done() and t in began]
            if graded_at is not None:
                limits.append(graded_at + AUDIT_GRACE_S)
            wait(grading + audits, timeout=max(0.01, min([started + usable] + limits) - now),
                 return_when="FIRST_COMPLETED")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return futures, began


def handle(event: Any, context: Any = None) -> list[dict]:
    samples = _samples(event)
    started = time.monotonic()
    usable = deadline.budget_from_context(context, cap=900.0) if context is not None else SAMPLE_TIME_LIMIT_S
    ends = started + usable                            # the invocation's real end, less the deadline margin
    usable = max(1.0, usable - BATCH_MARGIN_MS / 1000)
    spent: dict = defaultdict(list)
    refused: set = set()
    with deadline.running(usable):
        tasks = _plan(samples, spent, refused)
        try:
            tasks += _plan_audits(samples, spent)
        except Exception:  # noqa: BLE001 - the scores never depend on the watch
            logger.exception("audit planning failed")
        futures, began = _run(tasks, started, usable)
    out: list[dict | None] = [None] * len(samples)
    audits: dict[int, float | None] = {}
    for t, (task, future) in enumerate(zip(tasks, futures)):
        ok = future.done() and not future.cancelled() and future.exception() is None
        if task.kind == "audit":
            audits[task.indexes[0]] = future.result()[0] if ok else None
            continue
        results = future.result() if ok else None
        for k, i in enumerate(task.indexes):
            sample = samples[i]
            sample_id = str(sample.get("id")) if isinstance(sample, dict) else "unknown"
            if results is not None:
                out[i] = results[k]
            elif future.done() and not future.cancelled():  # grade_one never raises: belt and braces
                out[i] = _failed(sample_id, "other_error", "grading failed")
            elif task.kind == "lambda":
                out[i] = _failed(sample_id, "lambda_timeout", "the team's Lambda did not answer in time")
            elif t in began:
                out[i] = _failed(sample_id, "unresponsive_reward_error", "sample exceeded its time limit")
            else:
                out[i] = _failed(sample_id, "unresponsive_reward_error", "the invocation ran out of time before "
                                                                         "this sample started")
    try:
        _account(spent, refused)
    except Exception:  # noqa: BLE001 - the scores must reach Bedrock; each judge call is on the ledger anyway
        logger.exception("judge accounting failed", extra={"jobs": [f"{t}/{j}" for t, j in spent]})
    left = ends - time.monotonic() - 1.0
    if left >= RECORD_MIN_S:
        with deadline.running(left):
            _watch(samples, out, audits)
    logger.info("graded batch", extra={"samples": len(samples), "seconds": round(time.monotonic() - started, 3)})
    return out


def _watch(samples: list, out: list[dict], audits: dict[int, float | None]) -> None:
    """Records the rollouts and runs the training watch; never fails the invocation."""
    graded = []
    try:

        for i, (sample, answer) in enumerate(zip(samples, out)):
            owner = job_of(sample) if isinstance(sample, dict) else None
            if owner is None:
                continue
            response, item = split(sample)
            users = [m for m in item.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
            prompt_text = _text(users[-1].get("content")) if users else ""
            graded.append(rollouts.Graded(i, owner, rules.Sample.of(
                str(sample.get("id")), rules.prompt_key(sample, item.get("messages")), answer["aggregate_reward_score"],
                response, rules.error_kinds(answer.get("metrics_list")), audits.get(i), prompt_text=prompt_text),
                response, prompt_text, item.get("reference_answer")))
        if not graded:
            return
        for (team_id, job_id), cfg, window in rollouts.record(graded):
            try:
                raised = watch.check(team_id, job_id, cfg, window)
                if any(f.get("action") == "cancel" for f in raised):
                    _stop_now(team_id, job_id)
            except Exception:  # noqa: BLE001 - the next invocation checks again
                logger.exception("training watch failed", extra={"job_id": job_id})
    except Exception:  # noqa: BLE001 - the scores must reach Bedrock
        logger.exception("rollout recording failed", extra={"samples": len(graded)})


def _stop_now(team_id: str, job_id: str) -> None:
    """Asks Bedrock to stop the job at once, within this reward invocation's time (the invocation's
    deadline bounds the call), rather than at the reconciler's next pass: a finding in the last
    steps must not let training finish first (issue #24). A failure leaves it to the reconciler."""
    from chalicelib.training import state as job_state  # the hosted grader's training path only

    if deadline.remaining() < settings().bedrock_retry_deadline_seconds + 1:
        return      # Bedrock calls retry for up to that long: not within this invocation, so the reconciler's
    try:
        job = Job.get(team_id, job_id, consistent_read=True)
        job_state.enforce_stop(job)
    except Exception:  # noqa: BLE001 - the reconciler's enforce_stop repeats it; and the verdict holds anyway
        logger.warning("immediate stop failed; the reconciler will cancel", extra={"job_id": job_id})


def _account(spent: dict, refused: set) -> None:
    """One write per job per invocation: the judge cost on the job, and a stop when refused."""
    from chalicelib.training import record  # only the hosted grader's training path needs the jobs service

    for (team_id, job_id), costs in spent.items():
        if costs:
            record.add_judge_cost(team_id, job_id, sum(costs))
    for team_id, job_id in refused:
        record.request_stop(team_id, job_id, "budget_exhausted",
                          "The team's budget ran out during training, so the grader's judge calls were refused; "
                          "rft-hub stopped the job rather than train on zero rewards.")
