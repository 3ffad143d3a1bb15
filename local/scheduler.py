"""EventBridge Scheduler's part, locally: moto stores schedules but never runs them.

`fire(name, group)` delivers a schedule's target exactly as Scheduler does (its Input, with the
context attributes `<aws.scheduler.scheduled-time>` and `<aws.scheduler.execution-id>` filled in, sent
to its SQS target); `Runner` fires `rate(...)` schedules on time in `make run` (each schedule's first
firing one period after the runner first sees it). A `cron(...)` schedule fires only when asked
(POST /_local/scheduler/fire on the event pump's port): the local stack does not evaluate cron.
"""
from __future__ import annotations

import re
import threading
import time
import uuid
from datetime import UTC, datetime

import boto3

from local import servers

RATE = re.compile(r"^rate\((\d+) (minute|minutes|hour|hours|day|days)\)$")
UNIT = {"minute": 60, "hour": 3600, "day": 86400}


def fire(name: str, group: str, at: datetime | None = None) -> dict:
    scheduler = boto3.client("scheduler", region_name=servers.REGION)
    schedule = scheduler.get_schedule(Name=name, GroupName=group)
    target = schedule["Target"]
    when = (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = (target.get("Input") or "{}").replace("<aws.scheduler.scheduled-time>", when) \
        .replace("<aws.scheduler.execution-id>", str(uuid.uuid4()))
    if ":sqs:" not in target["Arn"]:
        raise ValueError(f"local scheduler sends to SQS targets only, not {target['Arn']}")
    sqs = boto3.client("sqs", region_name=servers.REGION)
    url = sqs.get_queue_url(QueueName=target["Arn"].rsplit(":", 1)[1])["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=body)
    return {"name": name, "group": group, "scheduled_time": when, "target": target["Arn"]}


class Runner:
    """Fires each rate(...) schedule of `group` every period (checked every `tick` seconds)."""

    def __init__(self, group: str, tick: float = 15.0) -> None:
        self.group, self.tick = group, tick
        self.next_at: dict[str, float] = {}
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, daemon=True, name="local-scheduler").start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        scheduler = boto3.client("scheduler", region_name=servers.REGION)
        while not self._stop.wait(self.tick):
            try:
                found = scheduler.list_schedules(GroupName=self.group).get("Schedules", [])
            except Exception:  # noqa: BLE001 - moto restarting: the next tick
                continue
            now = time.time()
            for item in found:
                detail = scheduler.get_schedule(Name=item["Name"], GroupName=self.group)
                match = RATE.match(detail.get("ScheduleExpression") or "")
                if not match or detail.get("State") == "DISABLED":
                    continue
                period = int(match.group(1)) * UNIT[match.group(2).rstrip("s")]
                due = self.next_at.setdefault(item["Name"], now + period)
                if now >= due:
                    self.next_at[item["Name"]] = now + period
                    try:
                        fire(item["Name"], self.group)
                    except Exception:  # noqa: BLE001 - deleted meanwhile
                        pass
