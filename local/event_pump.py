"""Drives the app's non-HTTP handlers locally, which `chalice local` never does.

- `@app.on_cw_event`: an EventBridge rule with the handler's own pattern on the
  (moto) default bus, targeting an SQS queue this pump drains; so patterns are
  really matched, and events arrive shaped exactly as EventBridge delivers them.
- `@app.schedule`: run on a shortened period (LOCAL_SCHEDULE_SECONDS).
- `@app.on_sqs_message`: the named queue is drained in batches; a raising handler
  leaves its messages for redelivery (and the queue's redrive policy).
- It also serves the Lambda Invoke API for `@app.lambda_function` handlers.

Faults for demonstrations and tests: POST /_local/pump {"drop_next": N, "duplicate_next": N}
drops or duplicates the next N EventBridge deliveries.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import threading
import uuid
from datetime import UTC, datetime

import boto3

from local import servers

QUEUE_PREFIX = "rfthub-local-pump-"


class _Context:
    function_name = "local-pump"
    memory_limit_in_mb = 512

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 900_000


def _rate_seconds(expression) -> float:
    text = expression if isinstance(expression, str) else expression.to_string()
    match = re.match(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", text)
    if not match:
        return 300.0
    unit = {"minute": 60, "hour": 3600, "day": 86400}[match.group(2).rstrip("s")]
    return int(match.group(1)) * unit


class Pump:
    def __init__(self, chalice_app, schedule_seconds: float | None = None, only: set[str] | None = None) -> None:
        self.app = chalice_app
        self.only = only        # handler names to drive (the tests drive the job worker only)
        self.sqs = boto3.client("sqs", region_name=servers.REGION)
        self.events = boto3.client("events", region_name=servers.REGION)
        self.schedule_seconds = schedule_seconds
        self.faults = {"drop_next": 0, "duplicate_next": 0}
        self.delivered: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # --- wiring ---------------------------------------------------------------------------------
    def _sources(self, kind: str):
        return [s for s in self.app.event_sources if type(s).__name__ == kind
                and (self.only is None or s.name in self.only)]

    def setup(self) -> None:
        for source in self._sources("CloudWatchEventConfig"):
            url = self.sqs.create_queue(QueueName=QUEUE_PREFIX + source.name)["QueueUrl"]
            arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            rule = f"rfthub-local-{source.name}"
            self.events.put_rule(Name=rule, EventPattern=json.dumps(source.event_pattern), State="ENABLED")
            self.events.put_targets(Rule=rule, Targets=[{"Id": "pump", "Arn": arn}])
        for source in self._sources("SQSEventConfig"):
            if source.queue:
                self.sqs.create_queue(QueueName=source.queue)

    def start(self) -> None:
        self.setup()
        for source in self._sources("CloudWatchEventConfig"):
            self._thread(self._drain_cw, source)
        for source in self._sources("SQSEventConfig"):
            if source.queue:
                self._thread(self._drain_sqs, source)
        for source in self._sources("ScheduledEventConfig"):
            self._thread(self._schedule, source)

    def stop(self) -> None:
        self._stop.set()

    def _thread(self, target, source) -> None:
        threading.Thread(target=target, args=(source,), daemon=True, name=f"pump-{source.name}").start()

    def _invoke(self, name: str, event: dict) -> None:
        self.app.handler_map[name](event, _Context())

    # --- loops ----------------------------------------------------------------------------------
    def _drain_cw(self, source) -> None:
        url = self.sqs.get_queue_url(QueueName=QUEUE_PREFIX + source.name)["QueueUrl"]
        while not self._stop.is_set():
            msgs = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
            for msg in msgs:
                event = json.loads(msg["Body"])
                # moto 5.2.5's SQS delivery drops the envelope's "account", which EventBridge always sets.
                event.setdefault("account", servers.ACCOUNT)
                copies = self._copies()
                try:
                    for _ in range(copies):
                        self._invoke(source.name, event)
                        self.delivered.append(event)
                except Exception as exc:  # noqa: BLE001 - the Lambda retry story: leave it on the queue
                    self.errors.append(f"{source.name}: {exc!r}")
                    continue
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])

    def _copies(self) -> int:
        with self._lock:
            if self.faults["drop_next"] > 0:
                self.faults["drop_next"] -= 1
                return 0
            if self.faults["duplicate_next"] > 0:
                self.faults["duplicate_next"] -= 1
                return 2
        return 1

    def _drain_sqs(self, source) -> None:
        url = self.sqs.get_queue_url(QueueName=source.queue)["QueueUrl"]
        while not self._stop.is_set():
            msgs = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=min(10, source.batch_size),
                                            WaitTimeSeconds=1, AttributeNames=["All"]).get("Messages", [])
            if not msgs:
                continue
            records = [{"messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
                        "attributes": m.get("Attributes", {}), "messageAttributes": {},
                        "eventSource": "aws:sqs", "awsRegion": servers.REGION,
                        "eventSourceARN": f"arn:aws:sqs:{servers.REGION}:{servers.ACCOUNT}:{source.queue}"}
                       for m in msgs]
            try:
                self._invoke(source.name, {"Records": records})
            except Exception as exc:  # noqa: BLE001 - whole batch is retried, as with Lambda
                self.errors.append(f"{source.name}: {exc!r}")
                continue
            self.sqs.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])

    def _schedule(self, source) -> None:
        period = self.schedule_seconds or _rate_seconds(source.schedule_expression)
        while not self._stop.wait(period):
            event = {"version": "0", "id": str(uuid.uuid4()), "detail-type": "Scheduled Event",
                     "source": "aws.events", "account": servers.ACCOUNT,
                     "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "region": servers.REGION,
                     "resources": [f"arn:aws:events:{servers.REGION}:{servers.ACCOUNT}:rule/{source.name}"],
                     "detail": {}}
            try:
                self._invoke(source.name, event)
            except Exception as exc:  # noqa: BLE001 - the next tick tries again
                self.errors.append(f"{source.name}: {exc!r}")


def main() -> None:
    from flask import jsonify, request

    from app import app as chalice_app
    from local import lambda_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--lambda-port", type=int, required=True)
    parser.add_argument("--schedule-seconds", type=float,
                        default=float(os.environ.get("LOCAL_SCHEDULE_SECONDS", "15")))
    args = parser.parse_args()
    pump = Pump(chalice_app, args.schedule_seconds)
    pump.start()
    from local import cloudwatch
    cloudwatch.Collector().install()          # this process' EMF lines into moto's CloudWatch
    cloudwatch.run_alarms(60.0)               # AWS/SQS's metrics and the alarms, each minute
    web = lambda_server.create_app(lambda_server.app_functions())

    @web.post("/_local/pump")
    def pump_faults():
        body = request.get_json(force=True)
        with pump._lock:
            pump.faults.update({k: int(v) for k, v in body.items() if k in pump.faults})
        return jsonify(pump.faults)

    from chalicelib.config import pipeline_schedule_group
    from local import scheduler
    scheduler.Runner(pipeline_schedule_group()).start()     # rate(...) schedules, on time

    @web.post("/_local/scheduler/fire")
    def fire_schedule():
        body = request.get_json(force=True, silent=True) or {}
        if not isinstance(body.get("name"), str):
            return jsonify({"error": "send {\"name\": <schedule name: the pipeline id>}"}), 400
        try:
            return jsonify(scheduler.fire(body["name"], body.get("group") or pipeline_schedule_group()))
        except Exception as exc:  # noqa: BLE001 - e.g. no such schedule: said plainly
            return jsonify({"error": str(exc)}), 404

    @web.get("/_local/pump")
    def pump_status():
        return jsonify({"faults": pump.faults, "delivered": len(pump.delivered), "errors": pump.errors[-20:]})

    from werkzeug.serving import make_server
    make_server("127.0.0.1", args.lambda_port, web, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
