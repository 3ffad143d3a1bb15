"""chalicelib/metrics.py: every line it writes is valid embedded metric format (EMF) as CloudWatch's
specification states it, carries no key and no text, uses only the declared dimension sets, and a
call never raises into its caller. Pure: the lines are taken from the module's line sinks."""
from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emf_spec import captured, check_emf  # noqa: E402  (tests/emf_spec.py)


def every_call(team: str, model: str, code: str, n: float) -> None:
    metrics.gateway_call(team, model, 200, n, n * 3, n, 10, 20, 1234, True)
    metrics.gateway_call(team, model, 503, n, None, None, None, None, None, False)
    metrics.budget_refusal(team)
    metrics.budget_threshold(team, 0.8)
    metrics.throttled(team, model)
    metrics.open_holds(team, 2)
    metrics.training_step("ftjob-abc", model, {"step": 3, "critic_rewards_mean": n, "response_length_mean": 120.5,
                                              "actor_entropy": 0.7})
    metrics.watch_finding(code, "critical")
    metrics.job_transition("running", "succeeded")
    metrics.preflight_refusal()
    metrics.reconciler_pass(4, 1)
    metrics.ledger_dlq_depth(3)
    metrics.slack_delivery_failed()
    metrics.alarm_posted()
    metrics.eval_run_finished(team, "completed", 40, 5678)


def test_every_metric_function_writes_valid_emf_in_the_declared_dimension_sets():
    with captured() as lines:
        every_call("team_abc", "openai.gpt-oss-20b", "length_hacking", 1.5)
    assert len(lines) == 15
    names = set()
    for line in lines:
        doc = check_emf(line)
        (directive,) = doc["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "RftHub"
        groups = {metrics.METRICS[m["Name"]][0] for m in directive["Metrics"]}
        assert len(groups) == 1                              # a document is one group's
        declared = [["Stage", *s] for s in metrics.DIMENSION_SETS[groups.pop()]]
        assert directive["Dimensions"] == declared and doc["Stage"] == "local"
        names |= {m["Name"] for m in directive["Metrics"]}
    assert names == set(metrics.METRICS)                 # every metric has a caller that writes it


def test_values_are_what_the_caller_measured():
    with captured() as lines:
        metrics.gateway_call("team_a", "m", 200, 1.25, 310.0, 42.0, 11, 29, 1234, True)
        metrics.gateway_call("team_a", "m", 429, 0.5, None, 7.0, None, None, None, False)
    first, second = (json.loads(x) for x in lines)
    assert (first["Calls"], first["InputTokens"], first["OutputTokens"], first["CostMicroUsd"]) == ([1], [11], [29],
                                                                                                     [1234])
    assert first["AddedLatency"] == [1.25] and first["UpstreamLatency"] == [310.0] and first["TimeToFirstToken"] == [42]
    assert first["ServerErrors"] == [0] and first["StreamedCalls"] == [1] and first["status"] == 200
    # A refused call: no upstream, no tokens; a first token only for streams.
    assert second["Throttled"] == [1] and second["ClientErrors"] == [1]
    assert {"UpstreamLatency", "InputTokens", "CostMicroUsd", "TimeToFirstToken"}.isdisjoint(second)


def test_a_ledger_entry_gives_the_calls_metrics_at_the_ledgers_exact_cost():
    from chalicelib.store.models import LedgerEntry

    entry = LedgerEntry("team_a#00", "k", team_id="team_a", request_id="req-1", key_id="0123456789abcdef", model="support-bot",
                        upstream_model="openai.gpt-oss-20b:ft-1", status=200, stream=True, latency_ms=412,
                        input_tokens=31, output_tokens=64, cost_micro=1234)
    with captured() as lines:
        metrics.ledger_call(entry, upstream_ms=400.5, ttft_ms=80.0)
        metrics.ledger_call(object())                          # not an entry: nothing, never a raise
    (line,) = lines
    doc = check_emf(line)
    assert (doc["Team"], doc["Model"]) == ("team_a", "openai.gpt-oss-20b:ft-1")    # the alias's model
    assert doc["AddedLatency"] == [11.5] and doc["UpstreamLatency"] == [400.5] and doc["TimeToFirstToken"] == [80]
    assert (doc["InputTokens"], doc["OutputTokens"], doc["CostMicroUsd"]) == ([31], [64], [1234])
    assert "req-1" not in line and "0123456789abcdef" not in line and "support-bot" not in line


def test_a_training_step_is_stamped_with_bedrocks_time_in_high_resolution():
    import time

    reported = int(time.time()) - 3600                        # synced an hour after Bedrock reported it
    before_ms = int(time.time() * 1000)
    with captured() as lines:
        metrics.training_step("ftjob-1", "m", {"step": 4, "critic_rewards_mean": 0.5}, at=reported)
        metrics.training_step("ftjob-1", "m", {"step": 5, "critic_rewards_mean": 0.6}, at=reported - 15 * 86400)
    fresh, stale = (check_emf(x) for x in lines)
    assert fresh["_aws"]["Timestamp"] == reported * 1000 and fresh["step"] == 4
    assert {m.get("StorageResolution") for m in fresh["_aws"]["CloudWatchMetrics"][0]["Metrics"]} == {1}
    # Older than CloudWatch takes (14 days): stamped now rather than dropped by CloudWatch.
    assert stale["_aws"]["Timestamp"] >= before_ms


def test_an_invocation_writes_once_at_its_end_one_line_per_dimension_values():
    with captured() as lines, metrics.invocation():
        for _ in range(3):
            metrics.watch_finding("templating", "critical")
        metrics.watch_finding("collapse", "warning")
        metrics.reconciler_pass(2, 0)
        assert lines == []                                  # nothing before the end
    docs = [json.loads(x) for x in lines]
    assert len(docs) == 3
    by_code = {d.get("Code"): d for d in docs}
    assert by_code["templating"]["WatchFindings"] == [1, 1, 1] and by_code["collapse"]["WatchFindings"] == [1]


def test_an_invocation_that_raises_still_writes_and_past_100_values_a_line_goes_out_early(capsys):
    capsys.readouterr()
    with captured() as lines:
        with pytest.raises(RuntimeError), metrics.invocation():
            for _ in range(250):
                metrics.preflight_refusal()
            raise RuntimeError("the handler failed")
    docs = [check_emf(x) for x in lines]
    assert [len(d["PreflightRefusals"]) for d in docs] == [99, 99, 52]
    assert capsys.readouterr().out.splitlines() == lines       # stdout (Lambda's log) got the same lines, no more


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.text(max_size=300), st.one_of(st.none(), st.booleans(), st.text(max_size=5),
       st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30)))
def test_any_input_writes_valid_emf_or_nothing_and_never_raises(team, model, number):
    with captured() as lines:
        metrics.gateway_call(team, model, number, number, number, number, number, number, number, True)
        metrics.training_step(team, model, {"critic_rewards_mean": number, "step": number})
        metrics.watch_finding(team, model)
        metrics.eval_run_finished(team, model, number, number)
    for line in lines:
        doc = check_emf(line)
        for key in ("Team", "Model", "Job", "Code", "Severity", "Status"):
            assert key not in doc or (0 < len(doc[key]) <= 128 and doc[key].isprintable())


KEYS = st.from_regex(r"rfth_[0-9a-f]{16}_[A-Za-z0-9_-]{32}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(KEYS, st.text(alphabet=string.ascii_letters + " ", max_size=40))
def test_a_key_or_a_bearer_header_passed_as_a_name_is_never_written(key, text):
    with captured() as lines:
        metrics.gateway_call(key, f"Bearer {key}", 200, 1, 2)
        metrics.gateway_call(f"team {key}", text, 200, 1, 2)
        metrics.training_step(key, text + key, {"critic_rewards_mean": 0.5})
    blob = "\n".join(lines)
    assert key not in blob and key[:21] not in blob and "rfth_" not in blob
    assert json.loads(lines[0])["Team"] == "redacted"


def test_dimension_sets_stay_bounded_whatever_the_keys_and_requests():
    """50 keys of 3 teams calling 2 models (each call with its own request id and key, which the
    gateway never passes as a dimension): the distinct dimension sets are the teams' and models'."""
    teams = [f"team_{i}" for i in range(3)]
    models = ["openai.gpt-oss-20b", "qwen.qwen3-32b-v1:0"]
    with captured() as lines:
        for n in range(50):
            key, request_id = f"rfth_{n:016x}_{'s' * 32}", f"req-{n}"
            team, model = teams[n % 3], models[n % 2]
            metrics.gateway_call(team, model, 200 if n % 7 else 500, n / 10, n, None, n, n, n)
            assert key not in lines[-1] and request_id not in lines[-1]
    sets = set()
    for line in lines:
        doc = check_emf(line)
        for dim_set in doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"]:
            sets.add(tuple((d, doc[d]) for d in dim_set))
    # [Stage, Team, Model] per pair seen, [Stage, Model] per model, [Stage] once: never per key or call
    assert len(sets) == 6 + 2 + 1


def test_a_sink_that_raises_never_reaches_the_caller():
    def broken(line):
        raise OSError("the collector is gone")

    metrics.LINE_SINKS.append(broken)
    try:
        metrics.preflight_refusal()
        with metrics.invocation():
            metrics.job_transition("queued", "running")
    finally:
        metrics.LINE_SINKS.remove(broken)
