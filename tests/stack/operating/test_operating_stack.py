"""Operating signals in the local stack (issue #26): the EMF lines the app writes reach moto's
CloudWatch (local/cloudwatch.py's collector, as CloudWatch Logs would extract them), the template's
alarms exist in moto, and a forced reconciler failure and a forced Slack dead letter each put their
alarm in ALARM -- evaluated from moto's metric data, since moto stores alarms but never evaluates
them -- and reach the platform's Slack channel once.

Test order matters and is the file's: the alarm tests run last, the dead-letter one moving the
evaluation clock forward (a queue's 5-minute maximum must pass before its alarm can clear)."""
import json
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import openai
import pytest
from emf_spec import captured, check_emf
from helpers import reconcile_until_ended, register_graders

from chalicelib import metrics
from local import cloudwatch
from local.example_graders import arn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import test_watch as watch_run  # noqa: E402  (tests/stack/training/test_watch.py: its hacked run)

STAGE = [{"Name": "Stage", "Value": "local"}]
OPS_HOOK = "/services/TLOCALOPS/BOPS/ops"


@pytest.fixture
def cw():
    return boto3.client("cloudwatch", region_name="us-west-2")




def stat(cw, name, dims, statistic, start, end=None):
    """One statistic of a metric with exactly these dimensions over [start, end), its minutes taken
    together (None: no datapoint). GetMetricData, which matches dimension sets exactly as CloudWatch
    does (moto's GetMetricStatistics also counts a metric whose dimensions merely include them)."""
    end = end or datetime.now(UTC) + timedelta(minutes=1)
    (result,) = cw.get_metric_data(StartTime=start, EndTime=end, MetricDataQueries=[{"Id": "q", "MetricStat": {
        "Metric": {"Namespace": "RftHub", "MetricName": name, "Dimensions": STAGE + dims},
        "Period": 60, "Stat": statistic}}])["MetricDataResults"]
    if not result["Values"]:
        return None
    return {"Sum": sum, "SampleCount": sum, "Maximum": max, "Minimum": min}[statistic](result["Values"])


def empty(sqs, url):
    """Every message taken off the queue (PurgeQueue allows one call a minute)."""
    while msgs := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60).get("Messages"):
        for m in msgs:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def ops_messages(stack, alarm):
    sink = stack.slack_app.config["sink"]
    with sink["lock"]:
        return [m["payload"] for m in sink["messages"] if m["path"].endswith(OPS_HOOK) and alarm in m["payload"]["text"]]


# ---- metrics --------------------------------------------------------------------------------------

def test_a_chat_call_and_a_streamed_call_are_in_moto_cloudwatch_at_the_ledgers_cost(make_team, stack, bedrock, cw):
    from chalicelib.spend import ledger

    start = datetime.now(UTC) - timedelta(minutes=1)
    team_id, key = make_team("operating-calls")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model="openai.gpt-oss-20b", max_tokens=8,
                                   messages=[{"role": "user", "content": "count to three"}])
    usage = None
    for chunk in client.chat.completions.create(model="openai.gpt-oss-20b", max_tokens=8, stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "and to four"}]):
        usage = chunk.usage or usage
    entries = []
    for _ in range(200):                              # a call is booked just after its answer
        entries = [e for e in ledger.entries(team_id) if e.kind == "inference"]
        if len(entries) == 2:
            break
        __import__("time").sleep(0.05)
    assert len(entries) == 2
    stack.cloudwatch.drain()
    dims = [{"Name": "Team", "Value": team_id}, {"Name": "Model", "Value": "openai.gpt-oss-20b"}]
    assert stat(cw, "Calls", dims, "Sum", start) == 2
    assert stat(cw, "StreamedCalls", dims, "Sum", start) == 1
    assert stat(cw, "CostMicroUsd", dims, "Sum", start) == sum(e.cost_micro for e in entries)      # the ledger
    assert stat(cw, "InputTokens", dims, "Sum", start) == sum(e.input_tokens for e in entries)
    assert stat(cw, "OutputTokens", dims, "Sum", start) == sum(e.output_tokens for e in entries)
    streamed = next(e for e in entries if e.stream)
    assert (streamed.input_tokens, streamed.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert stat(cw, "TimeToFirstToken", dims, "SampleCount", start) == 1
    assert stat(cw, "UpstreamLatency", dims, "SampleCount", start) == 1         # the plain call's


def test_a_job_steps_and_a_watch_finding_are_in_moto_cloudwatch(api, admin_headers, make_team, stack, bedrock, cw):
    start = datetime.now(UTC) - timedelta(minutes=1)
    team_id, key = make_team("operating")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    name = f"rft-grader-test-verbose-{uuid.uuid4().hex[:8]}"
    stack.lambda_app.config["functions"][name] = watch_run.verbose_grader
    register_graders(client, name)
    grader = {"type": "lambda", "name": "verbose", "lambda": {"function": arn(name)}}
    stack.cloudwatch.drain()
    findings_before = {sev: stat(cw, "WatchFindings", [{"Name": "Severity", "Value": sev}], "Sum", start) or 0
                       for sev in ("critical", "warning")}
    with captured() as lines:
        job, _, policy = watch_run.run_with_policy(stack, bedrock, client, grader, watch_run.hacking, total_steps=40)
        try:
            done = reconcile_until_ended(client, job.id, timeout=90)
        finally:
            policy.stop()
    assert done.status == "cancelled", done.error          # the watch found the hack and stopped it
    stack.cloudwatch.drain()                                # every line so far is in moto (a join, not a wait)
    assert stack.cloudwatch.errors == []

    for line in lines:                                      # what was written: EMF, no key, no text
        doc = check_emf(line)
        assert key not in line and key[:21] not in line and "Let me double-check" not in line
        assert set(doc) - {"_aws"} <= {"Stage", "Team", "Model", "Job", "Code", "Severity", "From", "To", "Status",
                                       "step", "status", "threshold", *metrics.METRICS}

    rewards = [e.data["critic_rewards_mean"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
               if e.type == "metrics" and "critic_rewards_mean" in (e.data or {})]
    assert rewards
    job_dims = [{"Name": "Job", "Value": job.id}]
    # Every step rft-hub copied is a RewardMean value of the job's own series (a step copied twice by
    # concurrent syncs counts twice, never less), with Bedrock's exact values.
    assert stat(cw, "RewardMean", job_dims, "SampleCount", start) >= len(rewards)
    assert stat(cw, "RewardMean", job_dims, "Maximum", start) == pytest.approx(max(rewards))
    assert stat(cw, "RewardMean", job_dims, "Minimum", start) == pytest.approx(min(rewards))
    assert stat(cw, "Entropy", job_dims, "SampleCount", start) >= len(rewards)
    model_dims = [{"Name": "Model", "Value": "openai.gpt-oss-20b"}]
    assert stat(cw, "TrainingSteps", model_dims, "Sum", start) >= len(rewards)

    status, watch = watch_run.watch_of(client, job.id)
    assert status == 200
    raised = watch["findings"]
    assert raised
    for sev in ("critical", "warning"):                     # one WatchFindings count per finding raised
        after = stat(cw, "WatchFindings", [{"Name": "Severity", "Value": sev}], "Sum", start) or 0
        assert after - findings_before[sev] == len([f for f in raised if f["severity"] == sev]), sev
    for f in raised:
        dims = [{"Name": "Code", "Value": f["code"]}, {"Name": "Severity", "Value": f["severity"]}]
        assert stat(cw, "WatchFindings", dims, "Sum", start) >= 1
    # The cancel's transition, from whichever state the reconciler found it in (a loaded machine can
    # find the job still validating), counted under the To-only dimension set.
    assert (stat(cw, "JobTransitions", [{"Name": "To", "Value": "cancelled"}], "Sum", start) or 0) >= 1
    assert stat(cw, "ReconcilerPasses", [], "Sum", start) >= 1


# ---- alarms ---------------------------------------------------------------------------------------

def test_the_templates_alarms_exist_in_moto(stack, cw):
    from deploy import template

    expected = {r["Properties"]["AlarmName"] for r in template.resources("local").values()
                if r.get("Type") == "AWS::CloudWatch::Alarm"}
    found = {a["AlarmName"] for page in cw.get_paginator("describe_alarms").paginate(AlarmNamePrefix="rft-hub-local-")
             for a in page["MetricAlarms"]}
    assert expected <= found and len(expected) >= 30
    (p99,) = cw.describe_alarms(AlarmNames=["rft-hub-local-GatewayAddedLatencyP99Alarm"])["MetricAlarms"]
    assert p99["ExtendedStatistic"] == "p99" and p99["AlarmActions"] == [cloudwatch.topic_arn("local")]


def test_a_failing_reconciler_raises_its_alarm_and_one_slack_message(stack, cw, ddb_faults):
    alarm = "rft-hub-local-ReconcilerFailingAlarm"
    from chalicelib.training import lifecycle

    cw.set_alarm_state(AlarmName=alarm, StateValue="OK", StateReason="test baseline")
    before = len(ops_messages(stack, alarm))
    # The expired-files sweep's query fails every time: that repair fails on each pass.
    ddb_faults.configure(rules=[{"error": "InternalServerError", "operation": "Query", "table": "files", "rate": 1}])
    try:
        reports = [lifecycle.reconcile() for _ in range(3)]
    finally:
        ddb_faults.reset()
    assert all(r.errors >= 1 for r in reports), [r.problems for r in reports]
    stack.cloudwatch.drain()
    notified: list[dict] = []
    states = cloudwatch.evaluate(notifications=notified)
    assert states[alarm] == "ALARM"
    assert cw.describe_alarms(AlarmNames=[alarm])["MetricAlarms"][0]["StateValue"] == "ALARM"
    posted = ops_messages(stack, alarm)
    assert len(posted) == before + 1 and posted[-1]["text"].startswith("ALARM: " + alarm)
    cloudwatch.evaluate()                                      # no change: nothing more
    (sent,) = [n for n in notified if n["AlarmName"] == alarm]
    cloudwatch.notify("local", sent)                           # SNS delivers at least once: a duplicate
    assert len(ops_messages(stack, alarm)) == before + 1


def test_a_slack_dead_letter_raises_its_alarm_once_and_its_clearing_follows_in_order(stack, cw):
    from chalicelib.slack import notifications as slack

    alarm = "rft-hub-local-SlackDeadLettersAlarm"
    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=slack.dead_letter_queue())["QueueUrl"]
    empty(sqs, url)
    cw.set_alarm_state(AlarmName=alarm, StateValue="OK", StateReason="test baseline")
    before = len(ops_messages(stack, alarm))

    now = datetime.now(UTC)
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"forced": "dead letter"}))
    cloudwatch.queue_metrics([slack.dead_letter_queue()], now=now)
    notified: list[dict] = []
    assert cloudwatch.evaluate(now=now, notifications=notified)[alarm] == "ALARM"
    posted = ops_messages(stack, alarm)
    assert len(posted) == before + 1 and posted[-1]["text"].startswith("ALARM: " + alarm)
    assert "Slack notifications were dead-lettered" in json.dumps(posted[-1]["blocks"])

    # Drained; six minutes on, the 5-minute maximum no longer sees the message: OK, posted after the ALARM.
    empty(sqs, url)
    later = now + timedelta(minutes=6)
    cloudwatch.queue_metrics([slack.dead_letter_queue()], now=later)
    assert cloudwatch.evaluate(now=later, notifications=notified)[alarm] == "OK"
    posted = ops_messages(stack, alarm)
    assert len(posted) == before + 2 and posted[-1]["text"].startswith("OK: " + alarm)

    # The ALARM notification delivered again, late (SNS neither orders nor deduplicates): nothing posted.
    (alarmed,) = [n for n in notified if n["AlarmName"] == alarm and n["NewStateValue"] == "ALARM"]
    assert cloudwatch.notify("local", alarmed) == ["superseded"]
    # A change never posted but older than the one posted last (SNS delivered it late): dropped too.
    older = {**alarmed, "NewStateValue": "INSUFFICIENT_DATA",
             "StateChangeTime": (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S.000+0000")}
    assert cloudwatch.notify("local", older) == ["superseded"]
    assert len(ops_messages(stack, alarm)) == before + 2
