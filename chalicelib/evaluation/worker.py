"""The eval worker (an SQS-triggered function, `eval_worker`): runs the eval runs that
evaluation/evals.py queues.

A message names a run; the worker takes the run's lease, reads its rows, and for each row not
yet stored samples the model through the gateway's metering (`metered.metered_call`: held to the
team's budget, on the ledger as kind `inference`, request id `<run id>.<item index>`), grades it
with the eval's testing criteria (judges metered as kind `grader`, `<run id>.<index>.j<n>`), and
stores the item's result once (a conditional put, in a transaction that also checks the run
still exists). A crash leaves the lease to expire; the redelivered message (or a read of the run,
or the worker's own continuation message when its time runs short) resumes the run, which skips
every stored item: completed items are never billed twice. At most CONCURRENCY items of a run
are in flight, and the function's SQS trigger runs at most MAX_RUNS runs at once. Deleted evals
and runs are purged here too, off the request path.
"""
from __future__ import annotations

import contextvars
import itertools
import json
import re
import secrets
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from pynamodb.exceptions import DoesNotExist, PynamoDBException, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib import bus, deadline, metrics, outbox
from chalicelib.adapters import lambdas
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import evals as rules
from chalicelib.domain import ids, pricing
from chalicelib.domain.events import EvalRunEnded
from chalicelib.domain.graders import Deps, JudgeRefused, judge_models, judge_specs
from chalicelib.domain.graders import run as run_grader
from chalicelib.domain.graders.templates import InvalidVariable, compile_template, make_sample
from chalicelib.domain.pipelines import RUN_METADATA_KEY as PIPELINE_RUN_KEY
from chalicelib.errors import ApiError
from chalicelib.evaluation import after_training, evals
from chalicelib.failures import retryable
from chalicelib.inference import judge, metered, targets, upstream
from chalicelib.log import logger
from chalicelib.spend import budgets, prices
from chalicelib.store import dynamo, lease
from chalicelib.store.models import EvalDefinition, EvalOutputItem, EvalRunRecord, connection

CONCURRENCY = 4                 # items of one run in flight at once
MAX_RUNS = 5                    # runs at once: the eval_worker's SQS trigger (maximum_concurrency)
MAX_ATTEMPTS = 5                # leases taken on one run before it is failed
CONTINUE_MARGIN_S = 60.0        # an invocation with less time left hands the rest to a fresh one
PROGRESS_EVERY_S = 2.0          # how often a running run's counts are saved
CHECK_EVERY_S = 1.0             # how often the worker re-reads the run (cancelled? deleted?)
MAX_TEXT_CHARS = 16_000         # per stored input/output text (an item is at most 400 KB in DynamoDB)
MAX_STORED_JSON = 350_000
JOIN_TOKENS = 2                 # a sample put into a judge's template may tokenize a little longer at its edges
_SAMPLE_VAR = re.compile(r"\{\{\s*sample\.[^{}]*?\}\}")


def handle_message(body: dict) -> str:
    """The eval worker's step for one message; safe to repeat."""
    if "purge_eval" in body:
        return purge_eval(body["team_id"], body["purge_eval"])
    if "purge_run" in body:
        return purge_run(body["eval_id"], body["purge_run"])
    return execute(body["team_id"], body["eval_id"], body["run_id"])


class StopRun(Exception):
    """Why a run stops before its last item: `status` (canceled | failed | None to leave the
    status as it is: cancelled by request, deleted, taken over, continued)."""

    def __init__(self, status: str | None, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Worker:
    def __init__(self, run: EvalRunRecord, ev: EvalDefinition, token: str, criteria: list, compiled: list,
                 ds: rules.DataSource, tally: rules.Tally):
        self.run, self.ev, self.token, self.ds, self.tally = run, ev, token, ds, tally
        self.criteria, self.compiled = criteria, compiled
        self.team_id, self.run_id = run.team_id, run.run_id
        self.key_id = run.key_id or "eval"
        self.lock = threading.Lock()
        self.committed = tally.cost_micro              # spent so far plus the worst case of what is in flight
        self.checked_at = 0.0
        self.saved_at = time.monotonic()
        self.target = self.price = None
        self.render = None
        if ds.type == "completions":
            self.target = targets.Target(run.model, run.upstream_model, run.base_model, run.alias)
            self.price = prices.price(run.upstream_model, run.base_model)
            if self.price is None:
                raise StopRun("failed", "model_not_priced", f"Model '{run.model}' has no price, so its calls cannot "
                                                            "be metered.")
            self.render = rules.input_renderer(ds.input_messages)
        self.judges = []
        for i, c in enumerate(criteria):
            path = f"testing_criteria[{i}]"
            for (model, param, cap), (spec, _) in zip(judge_models(c.spec, path), judge_specs(c.spec, path)):
                self.judges.append((targets.priced(self.team_id, model, param)[1], cap, _judge_input(spec)))

    # -- money -----------------------------------------------------------------------------------
    def worst(self, item: dict, sample: dict | None) -> int:
        """The most one item can cost, from what is sent: the generation's rendered messages at the
        output cap (as `generate` holds it), and each judge's input rendered with the item, every
        sample reference counted at the sample's full length, at the judge's output cap."""
        total = 0
        if self.ds.type == "completions":
            try:
                messages = self.render(item)
            except InvalidVariable:
                return 0                    # the item fails before any call
            total += budget_rules.worst_case_micro(self.price, budget_rules.prompt_tokens_estimate(
                [messages, self.ds.sampling.get("tools")]), self.ds.max_completion_tokens)
            out_tokens = self.ds.max_completion_tokens
        else:
            out_tokens = budget_rules.prompt_tokens_estimate(rules.sample_text(sample) or "")
        for price, cap, (parts, sample_refs) in self.judges:
            try:
                fixed = [{"role": role, "content": render(item, {})} for role, render in parts]
            except (InvalidVariable, ValueError):
                continue                    # the judge's input cannot render: the grader errs, no call
            prompt = budget_rules.prompt_tokens_estimate(fixed) + sample_refs * (out_tokens + JOIN_TOKENS)
            total += budget_rules.worst_case_micro(price, prompt, cap)
        return total

    # -- one item --------------------------------------------------------------------------------
    def generate(self, index: int, messages: list[dict]) -> tuple[str, str, dict, int]:
        s = self.ds.sampling
        body: dict[str, Any] = {"model": self.target.upstream, "messages": messages,
                                "max_tokens": self.ds.max_completion_tokens}
        for name in ("temperature", "top_p", "seed", "reasoning_effort", "response_format", "tools"):
            if s.get(name) is not None:
                body[name] = s[name]
        worst = budget_rules.worst_case_micro(self.price, budget_rules.prompt_tokens_estimate(
            [messages, s.get("tools")]), self.ds.max_completion_tokens)

        def invoke():
            _, _, raw = upstream.send(self.team_id, self.target, "/chat/completions", body)
            data = json.loads(raw)
            return data, metered.tokens(data.get("usage"), "chat")

        data, entry = metered.metered_call(self.team_id, self.key_id, f"{self.run_id}.{index}", self.target,
                                            self.price, worst, endpoint="/chat/completions", stream=False,
                                            invoke=invoke, kind="inference")
        choice = (data.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        text = message.get("content")
        if text is None and message.get("tool_calls"):
            text = json.dumps(message["tool_calls"])
        return text or "", choice.get("finish_reason") or "", data.get("usage") or {}, entry.cost_micro

    def judge_for(self, index: int, usage: dict, costs: list):
        """A judge for the graders: the gateway's metering path (kind `grader`), with request ids
        tied to the run and item, and each call's usage counted per model."""
        numbers = itertools.count()

        def call(model: str, messages: list[dict], sampling: dict) -> tuple[str, int]:
            try:
                text, used, entry = judge.metered_judge(self.team_id, self.key_id,
                                                          f"{self.run_id}.{index}.j{next(numbers)}", model, messages,
                                                          sampling)
            except budgets.OverBudget as err:
                raise JudgeRefused(err) from None
            costs.append(entry.cost_micro)
            _count(usage, model, used)
            return text, int(used.get("total_tokens") or 0)
        return call

    def process(self, index: int, item: dict, sample: dict | None, worst: int) -> None:
        try:
            self._process(index, item, sample)
        finally:
            with self.lock:
                self.committed -= worst

    def _process(self, index: int, item: dict, sample: dict | None) -> None:
        usage: dict = {}
        costs: list[int] = []
        error = None
        messages: list[dict] = []
        text, finish, model, used = None, "", self.run.model, {}
        problems = rules.schema_errors(self.ev.data_source_config.get("item_schema"), item)
        if problems:      # checked when the run was created: only a file changed since would get here
            error = {"code": "invalid_item", "message": "; ".join(problems[:3])}
        if self.ds.type == "completions" and error is None:
            try:
                messages = self.render(item)
            except InvalidVariable as exc:
                error = {"code": "invalid_variable_error", "message": str(exc)[:500]}
            if error is None:
                try:
                    text, finish, used, cost = self.generate(index, messages)
                    costs.append(cost)
                    _count(usage, self.run.upstream_model, used)
                except budgets.OverBudget as err:
                    raise StopRun("canceled", "budget_exhausted", f"The team's budget cannot pay for more calls: "
                                                                  f"{err.message}") from None
                except ApiError as err:            # the failed call is on the ledger too
                    error = {"code": str(err.code or "upstream_error"), "message": err.message[:500]}
        elif self.ds.type == "jsonl":
            text = rules.sample_text(sample)
            model = str((sample or {}).get("model") or "")
            finish = "stop"
            used = (sample or {}).get("usage") if isinstance((sample or {}).get("usage"), dict) else {}
            messages = (sample or {}).get("input") if isinstance((sample or {}).get("input"), list) else []
        results = []
        if error is None:
            graded = make_sample(text or "")
            deps = Deps(judge=self.judge_for(index, usage, costs), invoke_lambda=lambdas.invoke)
            for criterion, grader in zip(self.criteria, self.compiled):
                try:
                    r = run_grader(grader, graded, item, deps)
                except JudgeRefused as refused:
                    raise StopRun("canceled", "budget_exhausted", "The team's budget cannot pay for more judge "
                                                                  f"calls: {refused}") from None
                result = {"name": criterion.name, "type": criterion.type, "score": r.reward,
                          "passed": not r.errors and r.reward >= criterion.threshold,
                          "rft_pass_threshold": criterion.threshold}
                if r.errors:
                    result["rft_errors"] = sorted(r.errors)
                    result["rft_details"] = (r.details or "")[:500]
                if r.sub_rewards:
                    result["rft_sub_scores"] = r.sub_rewards
                results.append(result)
        errored = error is not None or any("rft_errors" in r for r in results)
        status = "pass" if error is None and results and all(r["passed"] for r in results) else "fail"
        s = {**rules.SAMPLING_DEFAULTS, **self.ds.sampling} if self.ds.type == "completions" else rules.SAMPLING_DEFAULTS
        view = {"input": [{"role": str(m.get("role")), "content": _clip(m.get("content"))} for m in messages
                          if isinstance(m, dict)],
                "output": [{"role": "assistant", "content": _clip(text)}] if text is not None else [],
                "finish_reason": finish, "model": model,
                "usage": {"total_tokens": int(used.get("total_tokens") or 0),
                          "completion_tokens": int(used.get("completion_tokens") or 0),
                          "prompt_tokens": int(used.get("prompt_tokens") or 0),
                          "cached_tokens": int((used.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)},
                "error": error or dict(evals.NO_ERROR), "temperature": float(s.get("temperature", 1.0)),
                "max_completion_tokens": self.ds.max_completion_tokens if self.ds.type == "completions" else 0,
                "top_p": float(s.get("top_p", 1.0)), "seed": int(s.get("seed", 42))}
        record = EvalOutputItem(self.run_id, index, eval_id=self.run.eval_id, status=status, errored=errored,
                                datasource_item=_fit(item), sample=view, results=results, usage=usage,
                                cost_micro=sum(costs), created_at=ids.now())
        stored = self.store(record)
        with self.lock:
            self.tally.add(stored.status, bool(stored.errored), stored.results or [], stored.usage or {},
                           int(stored.cost_micro or 0))
            self.committed += int(stored.cost_micro or 0)

    def store(self, record: EvalOutputItem) -> EvalOutputItem:
        """Once per item: a conditional put, with a check that the run still exists. An item an
        earlier attempt stored is kept as it was (this attempt's result is dropped)."""
        def put():
            with TransactWrite(connection=connection()) as tx:
                tx.condition_check(EvalRunRecord, self.run.eval_id, self.run_id,
                                   condition=EvalRunRecord.run_id.exists())
                tx.save(record, condition=EvalOutputItem.item_index.does_not_exist())
        try:
            dynamo.call(put, idempotent=True, what="eval output item")
            return record
        except TransactWriteError as exc:
            reasons = dynamo.reasons(exc)
            if reasons[:1] == ["ConditionalCheckFailed"]:
                raise StopRun(None, "deleted", "The run was deleted.") from None
            if dynamo.is_condition(exc):
                return EvalOutputItem.get(self.run_id, record.item_index, consistent_read=True)
            raise

    # -- control ---------------------------------------------------------------------------------
    def check(self) -> StopRun | None:
        """Re-reads the run now and then: cancelled, deleted or taken over stops it; so does a
        deadline too close to finish another item (the rest goes to a fresh invocation)."""
        if deadline.remaining() < CONTINUE_MARGIN_S:
            return StopRun(None, "continue", "The invocation's time is nearly up; continuing in another.")
        now = time.monotonic()
        if now - self.checked_at < CHECK_EVERY_S:
            return None
        self.checked_at = now
        fresh = evals.run_record(self.run.eval_id, self.run_id)
        if fresh is None:
            return StopRun(None, "deleted", "The run was deleted.")
        if fresh.lease_token != self.token:
            return StopRun(None, "taken_over", "Another worker took the run over.")
        if fresh.status != "in_progress":
            return StopRun(None, "canceled", "The run was canceled.")
        return None

    def save_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.saved_at < PROGRESS_EVERY_S:
            return
        self.saved_at = now
        with self.lock:
            summary = self.tally.summary()
        try:
            dynamo.call(lambda: self.run.update(actions=[EvalRunRecord.summary.set(summary),
                                                         EvalRunRecord.updated_at.set(ids.now())],
                                                condition=EvalRunRecord.lease_token == self.token),
                        idempotent=True, what="eval run progress")
        except UpdateError as exc:
            if not dynamo.is_condition(exc):
                raise


def _unexpected(exc: BaseException, where: str) -> dict:
    """A run's error for a failure no retry would change (never a traceback or a credential)."""
    detail = str(exc).replace("\n", " ")[:200]
    return {"code": "internal_error", "message": f"rft-hub could not process {where}: {type(exc).__name__}"
            + (f" ({detail})" if detail else "") + ". The run is failed rather than retried."}


def _judge_input(spec: dict) -> tuple[list, int]:
    """A judge's input messages without the sample (compiled: rendered with an item's fields) and
    how many times its templates put the sample in (each at most the sample's whole text)."""
    parts, refs = [], 0
    for msg in spec.get("input") or []:
        content = msg.get("content")
        content = content.get("text") if isinstance(content, dict) else content
        content = content if isinstance(content, str) else ""
        refs += len(_SAMPLE_VAR.findall(content))
        parts.append((str(msg.get("role")), compile_template(_SAMPLE_VAR.sub("", content))))
    return parts, refs


def _count(usage: dict, model: str | None, used: dict | None) -> None:
    used = used or {}
    have = usage.setdefault(model or "", [0, 0, 0, 0])
    have[0] += 1
    have[1] += int(used.get("prompt_tokens") or 0)
    have[2] += int(used.get("completion_tokens") or 0)
    have[3] += int((used.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def _clip(text: Any) -> str:
    text = text if isinstance(text, str) else json.dumps(text) if text is not None else ""
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + " [truncated by rft-hub]"


def _fit(item: dict) -> dict:
    return item if len(json.dumps(item)) <= MAX_STORED_JSON // 2 else {"rft_truncated": True}


def _lease(run: EvalRunRecord, token: str) -> bool:
    now = ids.now()
    extra = [EvalRunRecord.lease_token.set(token), EvalRunRecord.attempts.add(1), EvalRunRecord.updated_at.set(now)]
    if not run.started_at:
        extra.append(EvalRunRecord.started_at.set(now))
    return lease.take(run, EvalRunRecord.status, EvalRunRecord.lease_until, free="queued", taken="in_progress",
                      seconds=int(deadline.remaining()) + 30, extra=extra, open_ended=True, what="eval run lease")


def _release(run: EvalRunRecord, token: str, continued: bool = False) -> None:
    """Ends this worker's lease now; a continuation does not count as an attempt."""
    actions = [EvalRunRecord.lease_until.set(0)] + ([EvalRunRecord.attempts.add(-1)] if continued else [])
    try:
        # Conditional on the lease being held: a repeat after an unknown outcome changes nothing.
        dynamo.call(lambda: run.update(actions=actions, condition=(EvalRunRecord.lease_token == token) &
                                       (EvalRunRecord.lease_until > 0)),
                    idempotent=True, what="eval run release")
    except (UpdateError, ApiError):
        pass      # the lease runs out by itself


def execute(team_id: str, eval_id: str, run_id: str) -> str:
    """Runs (or resumes) one run. Safe to repeat: the lease admits one worker, stored items are skipped."""
    run = evals.run_record(eval_id, run_id)
    if run is None or run.team_id != team_id:
        return "gone"
    if run.status in rules.TERMINAL:
        return run.status
    try:
        ev = EvalDefinition.get(team_id, eval_id, consistent_read=True)
    except DoesNotExist:
        return "gone"                         # the eval was deleted: its purge removes the run
    token = secrets.token_hex(8)
    if not _lease(run, token):
        return "running elsewhere"
    run.refresh(consistent_read=True)
    if (run.attempts or 0) > MAX_ATTEMPTS:
        _finish(run, token, "failed", {"code": "too_many_attempts", "message": f"The run was started {MAX_ATTEMPTS} "
                                       "times without finishing."}, None)
        return "failed"
    try:
        return _execute(run, ev, token)
    except StopRun as stop:                       # before any item: a setup problem
        _finish(run, token, stop.status or "failed", {"code": stop.code, "message": stop.message}, None)
        return stop.status or "failed"
    except Exception as exc:
        if retryable(exc):
            _release(run, token)                  # a redelivery (or a read) resumes it without waiting for the lease
            raise
        # The same on every attempt (a bug, a value no retry reads differently): redelivering the
        # message would only repeat it (a poison message); the run fails and says why.
        logger.exception("eval run failed", extra={"run_id": run.run_id})
        _finish(run, token, "failed", _unexpected(exc, "the run"), None)
        return "failed"


def _execute(run: EvalRunRecord, ev: EvalDefinition, token: str) -> str:
    try:
        criteria = rules.criteria_from_stored(ev.testing_criteria)
        compiled = evals.compile_criteria(run.team_id, criteria)
        ds = rules.data_source_from_stored(run.data_source)
        rows = evals.source_rows(run.team_id, ds)
    except (ApiError, rules.EvalRuleError) as err:
        raise StopRun("failed", getattr(err, "code", None) or "invalid_run", err.message) from None
    tally = rules.Tally([c.name for c in criteria])
    done = set()
    for item in evals.stored_items(run.run_id):
        done.add(int(item.item_index))
        tally.add(item.status, bool(item.errored), item.results or [], item.usage or {}, int(item.cost_micro or 0))
    try:
        worker = _Worker(run, ev, token, criteria, compiled, ds, tally)
    except ApiError as err:             # a judge the team may no longer call
        raise StopRun("failed", err.code or "invalid_run", err.message) from None
    pending = iter([row for row in rows if row[0] not in done])
    stop: StopRun | None = None
    indexes: dict = {}                  # future -> its item's index (named when it fails)
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        inflight: set = set()
        while True:
            stop = stop or worker.check()
            while stop is None and len(inflight) < CONCURRENCY:
                row = next(pending, None)
                if row is None:
                    break
                worst = worker.worst(row[1], row[2])
                with worker.lock:
                    if run.max_micro is not None and worker.committed + worst > run.max_micro:
                        stop = StopRun("canceled", "cost_cap_reached",
                                       f"The run's cost cap of ${pricing.usd(run.max_micro)} was reached: the next item "
                                       f"could cost up to ${pricing.usd(worst)} and "
                                       f"${pricing.usd(worker.committed)} is spent or committed.")
                        break
                    worker.committed += worst
                # Each item runs in a copy of this context: its calls see the invocation's deadline.
                future = pool.submit(contextvars.copy_context().run, worker.process, *row, worst)
                inflight.add(future)
                indexes[future] = row[0]
            if not inflight:
                break
            finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    future.result()
                except StopRun as raised:
                    stop = stop or raised
                except Exception as exc:
                    if retryable(exc):
                        raise                 # resumed by the redelivered message (stored items are kept)
                    logger.exception("eval item failed", extra={"run_id": run.run_id, "item": indexes[future]})
                    failed = _unexpected(exc, f"item {indexes[future]}")
                    stop = stop or StopRun("failed", failed["code"], failed["message"])
            worker.save_progress()
    summary = tally.summary()
    if stop is not None and stop.code == "continue":
        worker.save_progress(force=True)
        _release(run, token, continued=True)
        evals.enqueue(run)
        return "continued"
    if stop is not None and stop.status is None:
        if stop.code == "canceled":
            _finish(run, token, None, None, summary)
        return stop.code
    status = stop.status if stop is not None else "completed"
    error = {"code": stop.code, "message": stop.message} if stop is not None else None
    _finish(run, token, status, error, summary)
    return status


def _finish(run: EvalRunRecord, token: str, status: str | None, error: dict | None, summary: dict | None) -> None:
    """The run's last write: its counts, and its final status with the outbound event in the same
    transaction. `status` None: the status was set elsewhere (cancelled): only the counts."""
    now = ids.now()
    actions = [EvalRunRecord.updated_at.set(now), EvalRunRecord.lease_token.remove(),
               EvalRunRecord.lease_until.remove()]
    if summary is not None:
        actions.append(EvalRunRecord.summary.set(summary))
    if status is None:
        try:
            dynamo.call(lambda: run.update(actions=actions, condition=EvalRunRecord.lease_token == token),
                        idempotent=True, what="eval run counts")
        except UpdateError as exc:
            if not dynamo.is_condition(exc):
                raise
        _after(run)
        return
    actions += [EvalRunRecord.status.set(status), EvalRunRecord.finished_at.set(now)]
    if error:
        actions.append(EvalRunRecord.error.set(error))
    final = summary or run.summary or {}
    event = outbox.stage("rft-hub.eval.run_finished", run.team_id, eval_id=run.eval_id, run_id=run.run_id,
                         status=status, model=run.model, upstream_model=run.upstream_model, job_id=run.job_id,
                         role=run.role, error=error, result_counts=final.get("result_counts"),
                         mean_scores=rules.means(final), cost_usd=pricing.usd(int(final.get("cost_micro") or 0)),
                         report_path=evals.report_path(run.eval_id, run.run_id))

    def write():
        with TransactWrite(connection=connection()) as tx:
            tx.update(run, actions=actions, condition=(EvalRunRecord.lease_token == token) &
                      (EvalRunRecord.status == "in_progress"))
            tx.save(event)
    try:
        dynamo.call(write, idempotent=True, what="eval run finish")
    except TransactWriteError as exc:
        if not dynamo.is_condition(exc):
            raise
        return _finish(run, token, None, None, summary)     # cancelled meanwhile: keep that, save the counts
    outbox.publish([event])
    counts = final.get("result_counts") or {}
    metrics.eval_run_finished(run.team_id, status, int(counts.get("total") or 0), int(final.get("cost_micro") or 0))
    _after(run)


def _after(run: EvalRunRecord) -> None:
    try:      # e.g. a pipeline run waiting on its eval runs (the pipelines' reconciler covers a miss)
        bus.emit(EvalRunEnded(run.team_id, run.eval_id, run.run_id, (run.metadata or {}).get(PIPELINE_RUN_KEY)))
    except (ApiError, PynamoDBException) as exc:
        logger.warning("eval run end not handled", extra={"run_id": run.run_id, "error": type(exc).__name__})
    if run.job_id:
        try:
            after_training.report_job(run.team_id, run.job_id)
        except (ApiError, PynamoDBException) as exc:
            logger.warning("job eval report deferred", extra={"job_id": run.job_id, "error": type(exc).__name__})


def purge_run(eval_id: str, run_id: str) -> str:
    """Deletes a deleted run's items (the run record is already gone)."""
    if evals.run_record(eval_id, run_id) is not None:
        return "exists"
    keys = [EvalOutputItem(run_id, int(i.item_index)) for i in evals.stored_items(run_id)]
    with EvalOutputItem.batch_write() as batch:
        for key in keys:
            batch.delete(key)
    return f"purged {len(keys)}"


def purge_eval(team_id: str, eval_id: str) -> str:
    try:
        EvalDefinition.get(team_id, eval_id, consistent_read=True)
        return "exists"
    except DoesNotExist:
        pass
    count = 0
    for run in list(EvalRunRecord.query(eval_id, consistent_read=True)):
        if run.team_id != team_id:
            continue
        run.delete()
        purge_run(eval_id, run.run_id)
        count += 1
    return f"purged {count} runs"
