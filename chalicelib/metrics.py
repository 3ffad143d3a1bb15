"""CloudWatch metrics in the embedded metric format (EMF), namespace `RftHub` (docs/operating.md).

The functions below are what the domain calls; each builds its metric document with Powertools'
EMF provider (its units, value checks and serialization) and never raises into the caller: a
metric is worth less than the request or the job step that produced it.

Dimensions are a small fixed list per metric group (`DIMENSION_SETS`), never a key, a request id,
a step or any other unbounded value: every set carries `Stage`, and a group adds only Team,
Model, Job (a job's own curves: bounded by the job's life), a watch finding's Code and Severity,
a job's From/To status, an eval run's Status. Values are sanitized to short printable strings; a
value shaped like an rft-hub key is never written (`_dim`).

Flushing: inside `invocation()` (every Lambda handler, app.py) metrics are buffered and written at
its end, one line per (group, dimension values); outside one (the data plane: one call per
request) a call writes its line at once. Powertools' `Metrics` keeps one metric set per process
(class attributes shared by every instance), which concurrent requests (the data plane's event
loop, the reconciler's threads) would mix across dimension sets; its provider class, one per
document, does not.

Lines go to stdout (Lambda -> CloudWatch Logs, which extracts EMF). `LINE_SINKS` lets the local
stack take the same lines into moto's CloudWatch (local/cloudwatch.py); nothing in chalicelib adds one.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

NAMESPACE = "RftHub"
# EMF takes at most 100 values in one metric's array; Powertools' provider prints a set by itself
# (bypassing LINE_SINKS) the moment a metric reaches 100, so a document holds at most 99.
MAX_VALUES = 99
_MAX_DIM_LEN = 128          # CloudWatch allows 1024; ours are ids and names, far shorter
# Shapes of a credential (an rft-hub key `rfth_<id>_<secret>`, a bearer header):
# a dimension value holding one is written as "redacted", whatever the caller passed by mistake.
_CREDENTIAL_MARKS = ("rfth_", "bearer ")

# group -> its dimension sets (each also carries Stage, first). The only dimensions there are.
DIMENSION_SETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gateway": (("Team", "Model"), ("Model",), ()),
    "team": (("Team",), ()),
    "training": (("Job",), ("Model",)),
    "watch": (("Code", "Severity"), ("Severity",)),
    "jobs": (("From", "To"), ("To",)),
    "evals": (("Team", "Status"), ("Status",)),
    "platform": ((),),
}
# Metric -> (group, unit). A metric is written only under its group's dimension sets.
METRICS: dict[str, tuple[str, str]] = {
    # the gateway, per call
    "Calls": ("gateway", "Count"), "ClientErrors": ("gateway", "Count"), "ServerErrors": ("gateway", "Count"),
    "Throttled": ("gateway", "Count"), "Unavailable": ("gateway", "Count"),
    "AddedLatency": ("gateway", "Milliseconds"), "UpstreamLatency": ("gateway", "Milliseconds"),
    "TimeToFirstToken": ("gateway", "Milliseconds"), "InputTokens": ("gateway", "Count"),
    "OutputTokens": ("gateway", "Count"), "CostMicroUsd": ("gateway", "None"), "StreamedCalls": ("gateway", "Count"),
    # money, per team
    "BudgetRefusals": ("team", "Count"), "BudgetThresholdCrossed": ("team", "Count"), "OpenHolds": ("team", "Count"),
    # training, per job step as Bedrock reports it
    "RewardMean": ("training", "None"), "ResponseLength": ("training", "None"), "Entropy": ("training", "None"),
    "TrainingSteps": ("training", "Count"),
    "WatchFindings": ("watch", "Count"),
    "JobTransitions": ("jobs", "Count"),
    # evals
    "EvalRunsFinished": ("evals", "Count"), "EvalItemsGraded": ("evals", "Count"),
    "EvalSpendMicroUsd": ("evals", "None"),
    # platform health
    "PreflightRefusals": ("platform", "Count"), "ReconcilerPasses": ("platform", "Count"),
    "ReconcilerRepairs": ("platform", "Count"), "ReconcilerFailures": ("platform", "Count"),
    "LedgerDeadLetterDepth": ("platform", "Count"), "SlackDeliveriesFailed": ("platform", "Count"),
    "AlarmsPosted": ("platform", "Count"),
}

# Training curves in high resolution (1 s): a job's steps can be seconds apart, and a 60 s metric
# would average them into one point. Each value is stamped with the time Bedrock reported the step.
HIGH_RESOLUTION = {"training"}
MAX_AGE_MS, MAX_AHEAD_MS = 14 * 86_400_000, 2 * 3_600_000     # what CloudWatch takes of a timestamp

LINE_SINKS: list[Callable[[str], None]] = []     # besides stdout: the local stack's collector

_buffer: contextvars.ContextVar[_Buffer | None] = contextvars.ContextVar("rfthub_metrics", default=None)


class _Buffer:
    """One invocation's metrics: (group, dimension values) -> {metric: [values]}."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.docs: dict[tuple, dict[str, list[float]]] = {}

    def add(self, key: tuple, values: dict[str, float]) -> None:
        with self.lock:
            doc = self.docs.setdefault(key, {})
            full = any(len(doc.get(name, ())) >= MAX_VALUES for name in values)
            if full:                         # EMF's 100 values per metric: write this one out now
                _write(key, self.docs.pop(key))
                doc = self.docs.setdefault(key, {})
            for name, value in values.items():
                doc.setdefault(name, []).append(value)

    def drain(self) -> list[tuple[tuple, dict[str, list[float]]]]:
        with self.lock:
            out, self.docs = list(self.docs.items()), {}
        return out


# ---- emission ---------------------------------------------------------------------------------

def _stage() -> str:
    return os.environ.get("RFT_STAGE", "local")


def _dim(value: object) -> str:
    """A dimension value: a short printable string; never an rft-hub key, never empty."""
    text = "".join(c for c in str(value if value is not None else "") if c.isprintable()).strip()[:_MAX_DIM_LEN]
    if any(mark in text.lower() for mark in _CREDENTIAL_MARKS):
        return "redacted"
    return text or "unknown"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _record(group: str, dims: dict[str, object], values: dict[str, object], props: dict | None = None,
            at_ms: int | None = None) -> None:
    """Buffers (inside an invocation) or writes one document (`at_ms`: its time, default now). Never raises."""
    try:
        clean = {name: v for name, raw in values.items() if (v := _number(raw)) is not None}
        if not clean:
            return
        key = (group, (("Stage", _stage()),) + tuple((k, _dim(dims.get(k))) for k in _names(group)),
               tuple(sorted((props or {}).items())), at_ms)
        buf = _buffer.get()
        if buf is None:
            _write(key, {k: [v] for k, v in clean.items()})
        else:
            buf.add(key, clean)
    except Exception:  # noqa: BLE001 - a metric never breaks its caller
        _failed()


def _names(group: str) -> tuple[str, ...]:
    seen: list[str] = []
    for dim_set in DIMENSION_SETS[group]:
        seen += [d for d in dim_set if d not in seen]
    return tuple(seen)


_local = threading.local()


def _provider():
    """This thread's Powertools EMF provider, emptied (made once: its constructor is a third of a
    document's cost, and a document is built without yielding, so a thread never shares one)."""
    provider = getattr(_local, "provider", None)
    if provider is None:
        from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider

        # service="" keeps Powertools from adding its own `service` dimension to the first set.
        provider = _local.provider = AmazonCloudWatchEMFProvider(namespace=NAMESPACE, service="")
    provider.metric_set.clear()
    provider.dimension_set.clear()
    provider.dimension_sets.clear()
    provider.metadata_set.clear()
    provider.timestamp = None
    return provider


def document(key: tuple, values: dict[str, list[float]]) -> dict:
    """One EMF document through Powertools' provider (unit and value checks, the EMF shape)."""
    group, dims, props, at_ms = key
    dims = dict(dims)
    sets = [("Stage", *dim_set) for dim_set in DIMENSION_SETS[group]]
    provider = _provider()
    provider.dimension_set.update({d: dims[d] for d in sets[0]})
    for dim_set in sets[1:]:
        provider.add_dimensions(**{d: dims[d] for d in dim_set})
    resolution = 1 if group in HIGH_RESOLUTION else 60
    for name, series in values.items():
        for value in series:
            provider.add_metric(name=name, unit=METRICS[name][1], value=value, resolution=resolution)
    if at_ms is not None:
        provider.timestamp = at_ms
    doc = provider.serialize_metric_set(metrics=provider.metric_set, dimensions=provider.dimension_set,
                                        metadata={})
    doc.update(dict(props))        # searchable in Logs Insights, never a dimension (a step, a status code)
    return doc


def _write(key: tuple, values: dict[str, list[float]]) -> None:
    try:
        line = json.dumps(document(key, values), separators=(",", ":"))
    except Exception:  # noqa: BLE001 - a metric never breaks its caller
        _failed()
        return
    sys.stdout.write(line + "\n")
    for sink in list(LINE_SINKS):
        with contextlib.suppress(Exception):
            sink(line)


_failures = 0


def _failed() -> None:
    global _failures
    _failures += 1           # read by tests; a log line per failure would flood on a systematic bug


def flush() -> int:
    """Writes what the current invocation buffered; returns how many lines."""
    buf = _buffer.get()
    if buf is None:
        return 0
    drained = buf.drain()
    for key, values in drained:
        _write(key, values)
    return len(drained)


@contextlib.contextmanager
def invocation() -> Iterator[None]:
    """Buffers the metrics of one Lambda invocation and writes them at its end (also on a raise)."""
    token = _buffer.set(_Buffer())
    try:
        yield
    finally:
        try:
            flush()
        finally:
            _buffer.reset(token)


# ---- what the domain calls ----------------------------------------------------------------------

def gateway_call(team_id: str, model: str, status: int, added_ms: float | None, upstream_ms: float | None,
                 ttft_ms: float | None = None, input_tokens: int | None = None, output_tokens: int | None = None,
                 cost_micro: int | None = None, stream: bool = False) -> None:
    """One gateway call (chat, responses; streamed or not) as served: `model` is what the call
    resolved to (an alias's model, never the alias), `status` the HTTP status answered."""
    status = status if isinstance(status, int) else 0
    values = {"Calls": 1, "ClientErrors": int(400 <= status < 500), "ServerErrors": int(status >= 500),
              "Throttled": int(status == 429), "Unavailable": int(status == 503), "StreamedCalls": int(bool(stream)),
              "AddedLatency": added_ms, "UpstreamLatency": upstream_ms, "TimeToFirstToken": ttft_ms if stream else None,
              "InputTokens": input_tokens, "OutputTokens": output_tokens, "CostMicroUsd": cost_micro}
    _record("gateway", {"Team": team_id, "Model": model}, values, {"status": status})


def ledger_call(entry, upstream_ms: float | None = None, ttft_ms: float | None = None) -> None:
    """`gateway_call` from a metered call's ledger entry (store.models.LedgerEntry, read by its
    fields): the team, the model it resolved to (`upstream_model`), the status, tokens and exact
    cost as the ledger has them; the gateway's added time is the entry's latency less `upstream_ms`."""
    try:
        latency = _number(getattr(entry, "latency_ms", None))
        upstream = _number(upstream_ms)
        added = max(0.0, latency - upstream) if latency is not None and upstream is not None else None
        gateway_call(entry.team_id, entry.upstream_model or entry.model, int(entry.status or 0), added, upstream,
                     ttft_ms, entry.input_tokens, entry.output_tokens, entry.cost_micro, bool(entry.stream))
    except Exception:  # noqa: BLE001 - a metric never breaks its caller
        _failed()


def budget_refusal(team_id: str) -> None:
    _record("team", {"Team": team_id}, {"BudgetRefusals": 1})


def budget_threshold(team_id: str, threshold: float | int | None = None) -> None:
    """A team crossed one of its budget thresholds (the event `rft-hub.budget.threshold_crossed`;
    `threshold` its fraction of the limit, kept as a property, never a dimension)."""
    _record("team", {"Team": team_id}, {"BudgetThresholdCrossed": 1},
            {"threshold": _number(threshold)} if _number(threshold) is not None else None)


def open_holds(team_id: str, count: int) -> None:
    _record("team", {"Team": team_id}, {"OpenHolds": count})


def throttled(team_id: str, model: str) -> None:
    """A call refused with 429 before it reached the gateway's metering (gateway_call counts the rest)."""
    _record("gateway", {"Team": team_id, "Model": model}, {"Throttled": 1, "Calls": 1, "ClientErrors": 1},
            {"status": 429})


def training_step(job_id: str, model: str, data: dict | None, at: int | float | None = None) -> None:
    """A Bedrock metrics event of a job (its `data`): reward mean, response length, entropy, at the
    time Bedrock reported it (`at`, epoch seconds; now when missing or outside what CloudWatch takes)."""
    data = data if isinstance(data, dict) else {}
    at_ms = None
    if _number(at) is not None:
        now_ms = time.time() * 1000
        at_ms = int(at * 1000) if now_ms - MAX_AGE_MS < at * 1000 < now_ms + MAX_AHEAD_MS else None
    values = {"TrainingSteps": 1, "RewardMean": data.get("critic_rewards_mean"),
              "ResponseLength": data.get("response_length_mean"), "Entropy": data.get("actor_entropy")}
    step = data.get("step")
    _record("training", {"Job": job_id, "Model": model}, values,
            {"step": step} if isinstance(step, int) and not isinstance(step, bool) else None, at_ms)


def watch_finding(code: str, severity: str) -> None:
    _record("watch", {"Code": code, "Severity": severity}, {"WatchFindings": 1})


def job_transition(from_status: str | None, to_status: str) -> None:
    _record("jobs", {"From": from_status or "none", "To": to_status}, {"JobTransitions": 1})


def preflight_refusal() -> None:
    _record("platform", {}, {"PreflightRefusals": 1})


def reconciler_pass(repairs: int, failures: int) -> None:
    _record("platform", {}, {"ReconcilerPasses": 1, "ReconcilerRepairs": repairs, "ReconcilerFailures": failures})


def ledger_dlq_depth(n: int) -> None:
    _record("platform", {}, {"LedgerDeadLetterDepth": n})


def slack_delivery_failed() -> None:
    _record("platform", {}, {"SlackDeliveriesFailed": 1})


def alarm_posted() -> None:
    _record("platform", {}, {"AlarmsPosted": 1})


def eval_run_finished(team_id: str, status: str, items_graded: int, spend_micro: int | None) -> None:
    _record("evals", {"Team": team_id, "Status": status},
            {"EvalRunsFinished": 1, "EvalItemsGraded": items_graded, "EvalSpendMicroUsd": spend_micro})
