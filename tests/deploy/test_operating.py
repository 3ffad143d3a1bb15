"""The template's operating part (deploy/operating.py, issue #26): the alarms, each to OperatorAlarms
with its reason in docs/operating.md; the alarm notifier subscribed to that topic; a dashboard;
a log group with retention for every function; traces on every function; and no function granted
cloudwatch:PutMetricData (EMF needs none). Read from the generator (the packaged template's
cfn-lint run is tests/deploy/test_deploy.py's)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template():
    from deploy import template as generator

    out = {"Resources": generator.resources("prod")}
    generator.add_dataplane(out, "prod")
    return out


def _of_type(template, kind):
    return {k: v for k, v in template["Resources"].items() if v.get("Type") == kind}


def test_the_alarms_the_issue_names_are_there_and_notify_the_operator_topic(template):
    alarms = _of_type(template, "AWS::CloudWatch::Alarm")
    for name in ("ApiServerErrorRateAlarm", "DataPlaneServerErrorRateAlarm", "LedgerDeadLettersAlarm",
                 "SlackDeadLettersAlarm", "ReconcilerFailingAlarm", "ReconcilerNotRunningAlarm", "JobBacklogAgeAlarm",
                 "EvalBacklogAgeAlarm", "GatewayAddedLatencyP99Alarm", "BudgetThresholdAlarm"):
        assert name in alarms, name
    from deploy.operating import FUNCTION_IDS
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    assert set(FUNCTION_IDS) == set(config["stages"]["prod"]["lambda_functions"]) | {"data_plane"}
    for logical in FUNCTION_IDS.values():                     # every function, the data plane too
        assert f"{logical}ErrorsAlarm" in alarms and f"{logical}ThrottlesAlarm" in alarms, logical
    docs = (ROOT / "docs" / "operating.md").read_text()
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', docs))
    for name, alarm in alarms.items():
        props = alarm["Properties"]
        assert props["AlarmActions"] == [{"Ref": "OperatorAlarms"}], name
        assert props["AlarmName"].startswith("rft-hub-prod-")
        reason = re.search(r"docs/operating\.md#([a-z0-9-]+)", props["AlarmDescription"])
        assert reason and reason.group(1) in anchors, (name, props["AlarmDescription"])   # its reason is written
    p99 = alarms["GatewayAddedLatencyP99Alarm"]["Properties"]
    assert p99["ExtendedStatistic"] == "p99" and p99["Namespace"] == "RftHub"
    assert alarms["ReconcilerNotRunningAlarm"]["Properties"]["TreatMissingData"] == "breaching"


def test_the_alarm_notifier_is_subscribed_to_the_topic_and_only_sns_may_invoke_it(template):
    res = template["Resources"]
    sub = res["AlarmNotifierSubscription"]["Properties"]
    assert sub == {"TopicArn": {"Ref": "OperatorAlarms"}, "Protocol": "lambda",
                   "Endpoint": {"Fn::GetAtt": ["AlarmNotifier", "Arn"]}}
    perm = res["AlarmNotifierPermission"]["Properties"]
    assert perm["Principal"] == "sns.amazonaws.com" and perm["SourceArn"] == {"Ref": "OperatorAlarms"}


def test_a_dashboard_with_traffic_cost_latency_jobs_rewards_findings_and_health(template):
    (board,) = _of_type(template, "AWS::CloudWatch::Dashboard").values()
    body = json.loads(board["Properties"]["DashboardBody"]["Fn::Sub"])
    titles = " | ".join(w["properties"]["title"] for w in body["widgets"])
    for word in ("Calls per team", "Cost per team", "own vs upstream", "Jobs by state", "Reward curves",
                 "watch findings", "Dead letters and reconciler"):
        assert word in titles, word
    text = json.dumps(body)
    assert "${" not in text.replace("${AWS::Region}", "")     # Fn::Sub substitutes only the region


def test_every_function_has_a_log_group_with_retention(template, monkeypatch):
    from deploy import operating

    groups = _of_type(template, "AWS::Logs::LogGroup")
    assert {g["Properties"]["LogGroupName"]["Fn::Sub"] for g in groups.values()} == \
        {f"/aws/lambda/${{{logical}}}" for logical in operating.FUNCTION_IDS.values()}
    assert {g["Properties"]["RetentionInDays"] for g in groups.values()} == {30}
    monkeypatch.setenv("RFT_LOG_RETENTION_DAYS", "90")
    assert {g["Properties"]["RetentionInDays"] for g in operating.log_groups().values()} == {90}
    monkeypatch.setenv("RFT_LOG_RETENTION_DAYS", "31")       # not a value CloudWatch Logs accepts: said at once
    with pytest.raises(SystemExit, match="RFT_LOG_RETENTION_DAYS"):
        operating.log_groups()


def test_every_function_is_traced_and_none_puts_metrics_directly(template):
    from deploy import template as generator

    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    for stage in ("dev", "prod"):
        assert config["stages"][stage]["xray"] is True          # chalice package: Tracing Active, API tracing
        assert "alarm_notifier" in config["stages"][stage]["lambda_functions"]
        for function, statements in generator.policies(stage).items():
            actions = {a for s in statements for a in s["Action"]}
            assert {"xray:PutTraceSegments", "xray:PutTelemetryRecords"} <= actions, function
            assert not any(a.startswith("cloudwatch:") for a in actions), function
    assert template["Resources"]["DataPlane"]["Properties"]["Tracing"] == "Active"
    assert template["Resources"]["RestAPI"]["Properties"]["TracingEnabled"] is True
    actions = {a for s in generator.dataplane_policy("prod") for a in s["Action"]}
    assert "xray:PutTraceSegments" in actions and not any(a.startswith("cloudwatch:") for a in actions)


def test_the_app_wraps_every_handler_in_one_middleware_and_loads_no_tracer_outside_lambda():
    """Locally (no AWS_LAMBDA_FUNCTION_NAME) X-Ray's SDK never loads: importing app and running a
    handler cost nothing for tracing."""
    from local.servers import local_stage_env

    code = ("import sys, app\n"
            "assert [m for m, kind in app.app.middleware_handlers] == [app.operate]\n"
            "from chalicelib import tracing\n"
            "with tracing.handler('x'):\n    pass\n"
            "print('aws_xray_sdk' in sys.modules)")
    env = {**local_stage_env(), "AWS_DEFAULT_REGION": "us-west-2", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "False"
