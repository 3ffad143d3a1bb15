"""CloudWatch, locally: what AWS does with rft-hub's metrics and alarms, done against moto's CloudWatch.

- `Collector`: CloudWatch Logs' EMF extraction. The EMF lines the app writes (chalicelib/metrics.py
  writes each to stdout and to `LINE_SINKS`) become PutMetricData calls on moto, one datum per
  metric and dimension set, as CloudWatch would extract them. A background thread puts them, so a
  request never waits on it; `drain()` returns once every line taken so far is in moto.
- `queue_metrics`: AWS/SQS's own metrics (visible messages, age of the oldest), which moto does not
  publish, read from moto's SQS and put as AWS would (AWS samples each minute).
- `create_alarms` and `evaluate`: the template's alarms (deploy/operating.py) created in moto, and
  evaluated from moto's metric data as CloudWatch would (moto stores alarms but never evaluates
  them): a state change is set on the alarm and sent, as the OperatorAlarms topic would, to the
  alarm notifier through the local Lambda Invoke API. Metric-math alarms are created, not evaluated.
"""
from __future__ import annotations

import json
import queue
import threading
from datetime import UTC, datetime, timedelta

import boto3

from local import servers

MAX_DATUMS = 20         # PutMetricData's per-call limit in older API versions: safe everywhere


def _client(name: str):
    return boto3.client(name, region_name=servers.REGION)


# ---- EMF lines -> PutMetricData ---------------------------------------------------------------------

def datums(line: str) -> list[tuple[str, dict]]:
    """(namespace, MetricDatum) for each metric of each dimension set of one EMF line; [] if the line
    is not EMF."""
    try:
        doc = json.loads(line)
        directives = doc["_aws"]["CloudWatchMetrics"]
        when = datetime.fromtimestamp(doc["_aws"]["Timestamp"] / 1000, UTC)
    except (ValueError, KeyError, TypeError):
        return []
    out = []
    for directive in directives:
        for dim_set in directive["Dimensions"]:
            dims = [{"Name": d, "Value": str(doc[d])} for d in dim_set]
            for metric in directive["Metrics"]:
                raw = doc[metric["Name"]]
                values = [float(v) for v in (raw if isinstance(raw, list) else [raw])]
                datum = {"MetricName": metric["Name"], "Dimensions": dims, "Timestamp": when, "Values": values,
                         "Counts": [1.0] * len(values), "Unit": metric.get("Unit") or "None"}
                if metric.get("StorageResolution") == 1:
                    datum["StorageResolution"] = 1
                out.append((directive["Namespace"], datum))
    return out


class Collector:
    """Takes EMF lines (`take`, a chalicelib.metrics line sink) into moto's CloudWatch."""

    def __init__(self) -> None:
        self.cloudwatch = _client("cloudwatch")
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str] = []
        self.put = 0
        threading.Thread(target=self._run, daemon=True, name="emf-collector").start()

    def take(self, line: str) -> None:
        self.lines.put(line)

    def install(self) -> Collector:
        from chalicelib import metrics

        if self.take not in metrics.LINE_SINKS:
            metrics.LINE_SINKS.append(self.take)
        return self

    def uninstall(self) -> None:
        from chalicelib import metrics

        if self.take in metrics.LINE_SINKS:
            metrics.LINE_SINKS.remove(self.take)

    def drain(self) -> None:
        """Returns when every line taken before the call is in moto (join, not a timed wait)."""
        self.lines.join()

    def _run(self) -> None:
        while True:
            line = self.lines.get()
            try:
                by_namespace: dict[str, list[dict]] = {}
                for namespace, datum in datums(line or ""):
                    by_namespace.setdefault(namespace, []).append(datum)
                for namespace, data in by_namespace.items():
                    for i in range(0, len(data), MAX_DATUMS):
                        self.cloudwatch.put_metric_data(Namespace=namespace, MetricData=data[i:i + MAX_DATUMS])
                        self.put += len(data[i:i + MAX_DATUMS])
            except Exception as exc:  # noqa: BLE001 - kept for the tests; the next line goes on
                self.errors.append(repr(exc)[:300])
            finally:
                self.lines.task_done()


# ---- AWS/SQS's metrics ----------------------------------------------------------------------------

def queue_metrics(names: list[str], now: datetime | None = None) -> None:
    """Puts each queue's ApproximateNumberOfMessagesVisible and ApproximateAgeOfOldestMessage, as of
    `now` (default: now)."""
    sqs, cw = _client("sqs"), _client("cloudwatch")
    now = now or datetime.now(UTC)
    for name in names:
        try:
            url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except sqs.exceptions.QueueDoesNotExist:
            continue
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
        visible = float(attrs.get("ApproximateNumberOfMessages", 0))
        oldest = 0.0
        if visible:   # the age of the oldest: peeked without taking it (visibility 0)
            msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0,
                                       AttributeNames=["SentTimestamp"]).get("Messages", [])
            sent = [int(m["Attributes"]["SentTimestamp"]) for m in msgs if "SentTimestamp" in m.get("Attributes", {})]
            oldest = max(0.0, now.timestamp() - min(sent) / 1000) if sent else 0.0
        dims = [{"Name": "QueueName", "Value": name}]
        cw.put_metric_data(Namespace="AWS/SQS", MetricData=[
            {"MetricName": "ApproximateNumberOfMessagesVisible", "Dimensions": dims, "Value": visible,
             "Unit": "Count", "Timestamp": now},
            {"MetricName": "ApproximateAgeOfOldestMessage", "Dimensions": dims, "Value": oldest,
             "Unit": "Seconds", "Timestamp": now}])


# ---- the template's alarms ----------------------------------------------------------------------

def topic_arn(stage: str) -> str:
    return f"arn:aws:sns:{servers.REGION}:{servers.ACCOUNT}:rfthub-{stage}-alarms"


def _resolve(value, stage: str, resources: dict):
    """The template's references, as CloudFormation would resolve them locally."""
    from deploy.operating import FUNCTION_IDS

    if isinstance(value, list):
        return [_resolve(v, stage, resources) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Ref"}:
        if value["Ref"] == "OperatorAlarms":
            return topic_arn(stage)
        names = {logical: name for name, logical in FUNCTION_IDS.items()}
        return f"rft-hub-{stage}-{names[value['Ref']]}"
    if set(value) == {"Fn::GetAtt"} and value["Fn::GetAtt"][1] == "QueueName":
        return resources[value["Fn::GetAtt"][0]]["Properties"]["QueueName"]
    return {k: _resolve(v, stage, resources) for k, v in value.items()}


def create_alarms(stage: str = "local") -> list[str]:
    """Every alarm of the template, created in moto (PutMetricAlarm with the template's properties)."""
    from deploy import template

    resources = template.resources(stage)
    sns = _client("sns")
    sns.create_topic(Name=f"rfthub-{stage}-alarms")
    cw = _client("cloudwatch")
    names = []
    for alarm in (r for r in resources.values() if r.get("Type") == "AWS::CloudWatch::Alarm"):
        props = _resolve(alarm["Properties"], stage, resources)
        cw.put_metric_alarm(**props)
        names.append(props["AlarmName"])
    return names


_COMPARE = {"GreaterThanThreshold": lambda v, t: v > t, "GreaterThanOrEqualToThreshold": lambda v, t: v >= t,
            "LessThanThreshold": lambda v, t: v < t, "LessThanOrEqualToThreshold": lambda v, t: v <= t}


def _breaching(alarm: dict, cw, now: datetime) -> bool | None:
    """Whether the alarm's last EvaluationPeriods breach (DatapointsToAlarm of them); None: not evaluable here."""
    stat = alarm.get("Statistic")
    if alarm.get("Metrics") or not stat:   # metric math or a percentile: moto computes neither
        return None
    period, periods = alarm["Period"], alarm["EvaluationPeriods"]
    needed = alarm.get("DatapointsToAlarm") or periods
    start = now - timedelta(seconds=period * periods)
    # GetMetricData: its dimension match is exact, as CloudWatch's is (moto's GetMetricStatistics also
    # takes metrics whose dimensions merely include the alarm's).
    (result,) = cw.get_metric_data(StartTime=start + timedelta(seconds=1), EndTime=now + timedelta(seconds=1),
                                   MetricDataQueries=[{"Id": "m", "MetricStat": {"Metric": {
                                       "Namespace": alarm["Namespace"], "MetricName": alarm["MetricName"],
                                       "Dimensions": alarm.get("Dimensions", [])}, "Period": period, "Stat": stat}}]
                                   )["MetricDataResults"]
    compare = _COMPARE[alarm["ComparisonOperator"]]
    values = result["Values"][-periods:]
    breaching = sum(1 for v in values if compare(v, alarm["Threshold"]))
    missing = max(0, periods - len(values))
    if alarm.get("TreatMissingData") == "breaching":
        breaching += missing
    return breaching >= needed


def evaluate(stage: str = "local", now: datetime | None = None, notifications: list | None = None) -> dict[str, str]:
    """Evaluates every evaluable alarm once, as of `now`; returns {alarm name: state}. A changed state
    is set on the alarm and its notification (CloudWatch's SNS message) sent to the alarm notifier
    (and appended to `notifications`)."""
    cw = _client("cloudwatch")
    now = now or datetime.now(UTC)
    states = {}
    for alarm in cw.describe_alarms(AlarmNamePrefix=f"rft-hub-{stage}-")["MetricAlarms"]:
        breaching = _breaching(alarm, cw, now)
        if breaching is None:
            states[alarm["AlarmName"]] = alarm["StateValue"]
            continue
        new = "ALARM" if breaching else "OK"
        states[alarm["AlarmName"]] = new
        if new == alarm["StateValue"]:
            continue
        reason = f"Threshold Crossed: the last {alarm['EvaluationPeriods']} period(s) were " + \
                 ("breaching" if breaching else "not breaching") + f" the threshold ({alarm['Threshold']})."
        cw.set_alarm_state(AlarmName=alarm["AlarmName"], StateValue=new, StateReason=reason)
        message = {"AlarmName": alarm["AlarmName"], "AlarmDescription": alarm.get("AlarmDescription"),
                   "AWSAccountId": servers.ACCOUNT, "NewStateValue": new, "NewStateReason": reason,
                   "StateChangeTime": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}+0000",
                   "Region": servers.REGION, "AlarmArn": alarm["AlarmArn"], "OldStateValue": alarm["StateValue"],
                   "Trigger": {"MetricName": alarm["MetricName"], "Namespace": alarm["Namespace"],
                               "Statistic": alarm["Statistic"], "Threshold": alarm["Threshold"]}}
        actions = alarm.get("AlarmActions" if new == "ALARM" else "OKActions") or []
        if topic_arn(stage) in actions:
            if notifications is not None:
                notifications.append(message)
            notify(stage, message)
    return states


def notify(stage: str, message: dict):
    """What SNS delivers to a Lambda subscriber (the alarm notifier); returns what it answered."""
    event = {"Records": [{"EventSource": "aws:sns", "EventVersion": "1.0", "Sns": {
        "Type": "Notification", "MessageId": f"{message['AlarmName']}-{message['StateChangeTime']}",
        "TopicArn": topic_arn(stage), "Subject": f"{message['NewStateValue']}: \"{message['AlarmName']}\"",
        "Message": json.dumps(message), "Timestamp": message["StateChangeTime"]}}]}
    answer = _client("lambda").invoke(FunctionName=f"rft-hub-{stage}-alarm_notifier",
                                      Payload=json.dumps(event).encode())
    return json.loads(answer["Payload"].read() or b"null")


def run_alarms(every_seconds: float, stage: str = "local") -> threading.Event:
    """`make run`: the queues' metrics put and the alarms evaluated every `every_seconds` (CloudWatch's
    minute), in a daemon thread; set the returned event to stop it."""
    from deploy import template

    queues = [r["Properties"]["QueueName"] for r in template.resources(stage).values()
              if r.get("Type") == "AWS::SQS::Queue"]
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_seconds):
            try:
                queue_metrics(queues)
                evaluate(stage)
            except Exception as exc:  # noqa: BLE001 - the next minute tries again
                print(f"(local alarms: {exc!r})", flush=True)

    threading.Thread(target=loop, daemon=True, name="local-alarms").start()
    return stop
