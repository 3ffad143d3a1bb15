"""What an operator needs in the template (issue #26; docs/operating.md gives each alarm's reason):
alarms on the OperatorAlarms topic, the function that posts them to the platform's Slack channel,
a CloudWatch dashboard, and a log group with retention for every function.

rft-hub's own metrics are EMF lines (chalicelib/metrics.py, namespace RftHub, every set with a
Stage dimension), so no function needs cloudwatch:PutMetricData.
"""
from __future__ import annotations

import json
import os

NAMESPACE = "RftHub"
# Chalice's logical ids of the functions (+ the data plane, deploy/template.py): name -> logical id.
FUNCTION_IDS = {"api_handler": "APIHandler", "on_bedrock_job_event": "OnBedrockJobEvent",
                "reconcile_jobs": "ReconcileJobs", "hosted_grader": "HostedGrader", "slack_notifier": "SlackNotifier",
                "slack_commands": "SlackCommands", "job_worker": "JobWorker", "eval_worker": "EvalWorker",
                "alarm_notifier": "AlarmNotifier", "data_plane": "DataPlane", "pipeline_worker": "PipelineWorker",
                "pipeline_triggers": "PipelineTriggers", "reconcile_pipelines": "ReconcilePipelines"}
# Function errors worth waking someone for, per 5 minutes. A queue consumer raises to leave a message
# queued (Slack's 429, a lease held elsewhere): a few are its retry path, a run of them is not.
ERRORS_PER_5_MIN = {"slack_notifier": 5, "slack_commands": 5, "job_worker": 3, "eval_worker": 3, "pipeline_worker": 3,
                    "pipeline_triggers": 3}
RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
                  3288, 3653)
P99_ADDED_MS = 50          # the gateway's own time per call (issue #14 budgets it well under this)


def log_retention_days() -> int:
    """RFT_LOG_RETENTION_DAYS at package time (default 30), one of the values CloudWatch Logs accepts."""
    raw = os.environ.get("RFT_LOG_RETENTION_DAYS", "30")
    try:
        days = int(raw)
    except ValueError:
        days = -1
    if days not in RETENTION_DAYS:
        raise SystemExit(f"RFT_LOG_RETENTION_DAYS={raw!r}: CloudWatch Logs keeps logs for one of {RETENTION_DAYS} days")
    return days


def _alarm(description: str, metric: dict | None = None, *, threshold: float, comparison: str,
           periods: int = 1, period: int = 300, datapoints: int | None = None, missing: str = "notBreaching",
           metrics: list | None = None) -> dict:
    props = {"AlarmDescription": description, "Threshold": threshold, "ComparisonOperator": comparison,
             "EvaluationPeriods": periods, "DatapointsToAlarm": datapoints or periods, "TreatMissingData": missing,
             "AlarmActions": [{"Ref": "OperatorAlarms"}], "OKActions": [{"Ref": "OperatorAlarms"}]}
    if metrics:
        props["Metrics"] = metrics
    else:
        props.update(metric)
        props["Period"] = period
    return {"Type": "AWS::CloudWatch::Alarm", "Properties": props}


def _own(name: str, stat: str, stage: str, extended: bool = False) -> dict:
    """One of rft-hub's metrics, fleet-wide for the stage (the [Stage] dimension set)."""
    key = "ExtendedStatistic" if extended else "Statistic"
    return {"Namespace": NAMESPACE, "MetricName": name, "Dimensions": [{"Name": "Stage", "Value": stage}], key: stat}


def _queue(ref: str, metric: str) -> dict:
    return {"Namespace": "AWS/SQS", "MetricName": metric, "Statistic": "Maximum",
            "Dimensions": [{"Name": "QueueName", "Value": {"Fn::GetAtt": [ref, "QueueName"]}}]}


def _lambda(logical: str, metric: str) -> dict:
    return {"Namespace": "AWS/Lambda", "MetricName": metric, "Statistic": "Sum",
            "Dimensions": [{"Name": "FunctionName", "Value": {"Ref": logical}}]}


def alarms(stage: str) -> dict:
    s = f"rft-hub {stage}"
    out = {
        # API Gateway counts every 5xx it answers (Lambda's and its own) as 1, others 0: the average is the rate.
        # ApiName is the REST API's name, which API Gateway takes from the definition's info.title
        # (chalice sets it to the app's name); Stage is chalice's api_gateway_stage.
        "ApiServerErrorRateAlarm": _alarm(
            f"{s}: over 5% of API requests answered 5xx for 10 minutes (docs/operating.md#api-5xx)",
            {"Namespace": "AWS/ApiGateway", "MetricName": "5XXError", "Statistic": "Average",
             "Dimensions": [{"Name": "ApiName", "Value": "rft-hub"}, {"Name": "Stage", "Value": "api"}]},
            threshold=0.05, comparison="GreaterThanThreshold", periods=2),
        # The gateway's own count (chalicelib/metrics.gateway_call): 5xx / calls, when there were calls.
        "DataPlaneServerErrorRateAlarm": _alarm(
            f"{s}: over 5% of gateway calls answered 5xx for 10 minutes (docs/operating.md#data-plane-5xx)",
            threshold=5, comparison="GreaterThanThreshold", periods=2, metrics=[
                {"Id": "errors", "ReturnData": False, "MetricStat": {
                    "Metric": {k: v for k, v in _own("ServerErrors", "", stage).items() if k != "Statistic"},
                    "Period": 300, "Stat": "Sum"}},
                {"Id": "calls", "ReturnData": False, "MetricStat": {
                    "Metric": {k: v for k, v in _own("Calls", "", stage).items() if k != "Statistic"},
                    "Period": 300, "Stat": "Sum"}},
                {"Id": "rate", "Label": "5xx percent", "ReturnData": True,
                 "Expression": "IF(calls > 0, 100 * errors / calls, 0)"}]),
        "GatewayAddedLatencyP99Alarm": _alarm(
            f"{s}: the gateway's own p99 time per call above {P99_ADDED_MS} ms (docs/operating.md#added-latency)",
            _own("AddedLatency", "p99", stage, extended=True), threshold=P99_ADDED_MS,
            comparison="GreaterThanThreshold", periods=3, datapoints=2),
        "LedgerDeadLettersAlarm": _alarm(
            f"{s}: ledger entries DynamoDB refused wait in the dead-letter queue (docs/operating.md#ledger-dlq)",
            _queue("LedgerDeadLetterQueue", "ApproximateNumberOfMessagesVisible"),
            threshold=0, comparison="GreaterThanThreshold"),
        "SlackDeadLettersAlarm": _alarm(
            f"{s}: Slack notifications were dead-lettered (docs/operating.md#slack-dlq)",
            _queue("SlackDeadLetterQueue", "ApproximateNumberOfMessagesVisible"),
            threshold=0, comparison="GreaterThanThreshold"),
        "JobBacklogAgeAlarm": _alarm(
            f"{s}: a new job waited over 30 minutes for the job worker (docs/operating.md#backlog)",
            _queue("JobsQueue", "ApproximateAgeOfOldestMessage"), threshold=1800, comparison="GreaterThanThreshold"),
        "EvalBacklogAgeAlarm": _alarm(
            f"{s}: an eval run waited over an hour for the eval worker (docs/operating.md#backlog)",
            _queue("EvalsQueue", "ApproximateAgeOfOldestMessage"), threshold=3600, comparison="GreaterThanThreshold"),
        "ReconcilerFailingAlarm": _alarm(
            f"{s}: the reconciler's repairs failed 3 times or more in 10 minutes (docs/operating.md#reconciler)",
            _own("ReconcilerFailures", "Sum", stage), threshold=3, comparison="GreaterThanOrEqualToThreshold",
            period=600),
        # No pass in 10 minutes (it runs every 2): missing data is the very thing to alarm on.
        "ReconcilerNotRunningAlarm": _alarm(
            f"{s}: no reconciler pass finished in 10 minutes (docs/operating.md#reconciler)",
            _own("ReconcilerPasses", "Sum", stage), threshold=1, comparison="LessThanThreshold", period=600,
            missing="breaching"),
        "BudgetThresholdAlarm": _alarm(
            f"{s}: a team crossed one of its budget thresholds (docs/operating.md#budget)",
            _own("BudgetThresholdCrossed", "Sum", stage), threshold=0, comparison="GreaterThanThreshold"),
    }
    for name, logical in FUNCTION_IDS.items():
        out[f"{logical}ErrorsAlarm"] = _alarm(
            f"{s}: {name} raised {ERRORS_PER_5_MIN.get(name, 1)}+ errors in 5 minutes (docs/operating.md#function-errors)",
            _lambda(logical, "Errors"), threshold=ERRORS_PER_5_MIN.get(name, 1),
            comparison="GreaterThanOrEqualToThreshold")
        out[f"{logical}ThrottlesAlarm"] = _alarm(
            f"{s}: Lambda throttled {name} (docs/operating.md#function-errors)",
            _lambda(logical, "Throttles"), threshold=0, comparison="GreaterThanThreshold")
    for logical, alarm in out.items():     # named: the name is what Slack and the console show
        alarm["Properties"]["AlarmName"] = f"rft-hub-{stage}-{logical}"
    return out


def alarm_notifier() -> dict:
    """The topic's subscription to the alarm notifier (declared here, so it follows the topic)."""
    return {
        "AlarmNotifierSubscription": {"Type": "AWS::SNS::Subscription", "Properties": {
            "TopicArn": {"Ref": "OperatorAlarms"}, "Protocol": "lambda",
            "Endpoint": {"Fn::GetAtt": ["AlarmNotifier", "Arn"]}}},
        "AlarmNotifierPermission": {"Type": "AWS::Lambda::Permission", "Properties": {
            "FunctionName": {"Ref": "AlarmNotifier"}, "Action": "lambda:InvokeFunction",
            "Principal": "sns.amazonaws.com", "SourceArn": {"Ref": "OperatorAlarms"}}},
    }


def log_groups() -> dict:
    """Every function's log group, with retention (Lambda would create it without one)."""
    days = log_retention_days()
    return {f"{logical}LogGroup": {"Type": "AWS::Logs::LogGroup", "DeletionPolicy": "Delete",
                                   "UpdateReplacePolicy": "Delete", "Properties": {
        "LogGroupName": {"Fn::Sub": f"/aws/lambda/${{{logical}}}"}, "RetentionInDays": days}}
        for logical in FUNCTION_IDS.values()}


def _search(metric: str, dims: str, stat: str, stage: str, label: str) -> list:
    """One series per dimension value (a team, a job): a SEARCH, since the values are not known here."""
    return [[{"expression": f"SEARCH('{{{NAMESPACE},{dims}}} MetricName=\"{metric}\" Stage=\"{stage}\"', "
                            f"'{stat}', 300)", "label": label, "id": "q1"}]]


def _widget(title: str, metrics: list, x: int, y: int, w: int = 12, h: int = 6, stat: str = "Sum",
            view: str = "timeSeries") -> dict:
    return {"type": "metric", "x": x, "y": y, "width": w, "height": h, "properties": {
        "title": title, "metrics": metrics, "view": view, "stat": stat, "period": 300,
        "region": "${AWS::Region}"}}


def dashboard(stage: str) -> dict:
    own = [NAMESPACE, "{name}", "Stage", stage]

    def m(name: str, **opts) -> list:
        return [x.replace("{name}", name) for x in own] + ([opts] if opts else [])

    widgets = [
        _widget("Calls per team", _search("Calls", "Stage,Team,Model", "Sum", stage, "calls"), 0, 0),
        _widget("Cost per team (micro-USD)", _search("CostMicroUsd", "Stage,Team,Model", "Sum", stage, "cost"), 12, 0),
        _widget("Gateway latency: own vs upstream (p50, p99)",
                [m("AddedLatency", stat="p50", label="own p50"), m("AddedLatency", stat="p99", label="own p99"),
                 m("UpstreamLatency", stat="p50", label="upstream p50"),
                 m("UpstreamLatency", stat="p99", label="upstream p99"),
                 m("TimeToFirstToken", stat="p50", label="first token p50")], 0, 6),
        _widget("Gateway errors, throttles, budget refusals",
                [m("ServerErrors"), m("ClientErrors"), m("Throttled"), m("Unavailable")], 12, 6),
        _widget("Jobs by state (transitions into)", _search("JobTransitions", "Stage,To", "Sum", stage, "to"), 0, 12),
        _widget("Reward curves of running jobs", _search("RewardMean", "Stage,Job", "Average", stage, "reward"),
                12, 12, stat="Average"),
        _widget("Training watch findings", _search("WatchFindings", "Stage,Code,Severity", "Sum", stage, "findings"),
                0, 18),
        _widget("Dead letters and reconciler health",
                [m("LedgerDeadLetterDepth", stat="Maximum"), m("ReconcilerPasses"), m("ReconcilerRepairs"),
                 m("ReconcilerFailures"), m("SlackDeliveriesFailed"),
                 ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", f"rfthub-{stage}-slack-dlq",
                  {"stat": "Maximum"}],
                 ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", f"rfthub-{stage}-ledger-dlq",
                  {"stat": "Maximum"}]], 12, 18),
        _widget("Evals: runs finished, items graded", [m("EvalRunsFinished"), m("EvalItemsGraded")], 0, 24),
        _widget("Eval spend per team (micro-USD)",
                _search("EvalSpendMicroUsd", "Stage,Team,Status", "Sum", stage, "spend"), 12, 24),
    ]
    body = json.dumps({"widgets": widgets}, separators=(",", ":"))
    return {"OperatorDashboard": {"Type": "AWS::CloudWatch::Dashboard", "Properties": {
        "DashboardName": f"rft-hub-{stage}", "DashboardBody": {"Fn::Sub": body}}}}


def resources(stage: str) -> dict:
    return {**alarms(stage), **alarm_notifier(), **log_groups(), **dashboard(stage)}


def notifier_policy(stage: str) -> list[dict]:
    """The alarm notifier: its delivery record and per-alarm order (two tables), the platform's
    webhook (one secret), its logs."""
    arns = [f"arn:aws:dynamodb:*:*:table/rfthub-{stage}-{n}" for n in ("slack_deliveries", "slack_job_cursors")]
    return [
        {"Sid": "Deliveries", "Effect": "Allow", "Action": ["dynamodb:GetItem", "dynamodb:UpdateItem"],
         "Resource": arns},
        {"Sid": "Webhook", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
         "Resource": [f"arn:aws:secretsmanager:*:*:secret:rfthub/{stage}/ops-slack-webhook-*"]},
    ]


# X-Ray takes no resource: the two write actions on "*" (what AWSXRayDaemonWriteAccess grants).
XRAY = {"Sid": "Traces", "Effect": "Allow", "Action": ["xray:PutTelemetryRecords", "xray:PutTraceSegments"],
        "Resource": ["*"]}
