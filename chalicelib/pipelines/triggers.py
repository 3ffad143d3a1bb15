"""What starts a pipeline run, arriving on one queue (issue #27):

* a schedule: EventBridge Scheduler sends the schedule's input, {"trigger": "schedule", "team_id",
  "pipeline_id", "scheduled_time": "<aws.scheduler.scheduled-time>"} (the time makes a repeated
  delivery the same run);
* new data: S3's EventBridge notification "Object Created" for a key under
  `incoming/<team>/<pipeline>/` (the event's id makes a repeat the same run);
* an internal app: an event on rft-hub's bus, detail-type `rft-hub.pipeline.trigger`, detail
  {"team_id", "pipeline_id"}.
Anything else is logged and dropped (a poison message must not block the queue)."""
from __future__ import annotations

import json

from chalicelib.log import logger
from chalicelib.pipelines import runs

TRIGGER_DETAIL_TYPE = "rft-hub.pipeline.trigger"


def handle(body: str, message_id: str | None = None) -> str:
    try:
        msg = json.loads(body)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        logger.warning("unreadable pipeline trigger dropped")
        return "dropped"
    if msg.get("trigger") == "schedule":
        found = runs.trigger(str(msg.get("team_id")), str(msg.get("pipeline_id")), "schedule",
                             trigger_id=f"schedule:{msg.get('pipeline_id')}:{msg.get('scheduled_time')}",
                             at=msg.get("scheduled_time"))
        return "started" if found else "ignored"
    detail = msg.get("detail") if isinstance(msg.get("detail"), dict) else {}
    if msg.get("source") == "aws.s3" and msg.get("detail-type") == "Object Created":
        key = str((detail.get("object") or {}).get("key") or "")
        parts = key.split("/")
        if len(parts) < 4 or parts[0] != "incoming" or not key.endswith(".jsonl"):
            return "ignored"
        # The event's id names a delivery on AWS; the key and its ETag name the object whatever the
        # id (moto gives every S3 event the same one).
        etag = (detail.get("object") or {}).get("etag")
        found = runs.trigger(parts[1], parts[2], "new_data", trigger_id=f"s3:{msg.get('id')}:{key}:{etag}",
                             at=msg.get("time"),
                             detail={"key": key})
        return "started" if found else "ignored"
    if msg.get("detail-type") == TRIGGER_DETAIL_TYPE:
        team_id, pipeline_id = detail.get("team_id"), detail.get("pipeline_id")
        if not isinstance(team_id, str) or not isinstance(pipeline_id, str):
            logger.warning("pipeline trigger event without team_id and pipeline_id dropped")
            return "dropped"
        found = runs.trigger(team_id, pipeline_id, "event", trigger_id=f"event:{msg.get('id')}", at=msg.get("time"),
                             detail={"source": msg.get("source")})
        return "started" if found else "ignored"
    logger.warning("unknown pipeline trigger dropped", extra={"message_id": message_id})
    return "dropped"
