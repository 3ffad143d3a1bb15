"""rft-hub's own events, published to its EventBridge bus reliably (transactional outbox).

An event is written to the outbox table in the same DynamoDB transaction as the change it
describes, then published. If EventBridge fails, the item stays and the reconciler
publishes it later, so nothing is lost; consumers dedupe on `detail.event_id`.

Detail schema (version "1"): {"schema_version": "1", "event_id", "occurred_at" (unix s),
"team_id", ...type-specific fields} -- documented in docs/events.md.
"""
from __future__ import annotations

import json
import os

from chalicelib.adapters import aws
from chalicelib.domain import ids
from chalicelib.log import logger
from chalicelib.store import dynamo
from chalicelib.store.models import OutboxEvent

SOURCE = "rft-hub"
SCHEMA_VERSION = "1"
PENDING = "pending"


def bus_name() -> str:
    stage = os.environ.get("RFT_STAGE", "local")
    return os.environ.get("RFT_EVENT_BUS", f"rfthub-{stage}")


def stage(detail_type: str, team_id: str, *, event_id: str | None = None, **fields) -> OutboxEvent:
    """A new, unsaved outbox item; save it in the transaction of the change it describes.
    A deterministic `event_id` makes an announcement happen once (save it conditionally)."""
    event_id = event_id or ids.new_id("evt")
    now = ids.now()
    detail = {"schema_version": SCHEMA_VERSION, "event_id": event_id, "occurred_at": now, "team_id": team_id,
              **fields}
    return OutboxEvent(event_id, detail_type=detail_type, detail=detail, created_at=now, pending_shard=PENDING)


def publish(events: list[OutboxEvent]) -> int:
    """Publishes staged (already saved) events; returns how many went out. Never raises."""
    sent = 0
    for start in range(0, len(events), 10):   # PutEvents takes at most 10 entries
        batch = events[start:start + 10]
        entries = [{"Source": SOURCE, "DetailType": e.detail_type, "Detail": json.dumps(e.detail),
                    "EventBusName": bus_name()} for e in batch]
        try:
            results = aws.events().put_events(Entries=entries)["Entries"]
        except Exception as exc:  # noqa: BLE001 - kept in the outbox for the next attempt
            logger.warning("event publish failed", extra={"error": type(exc).__name__, "count": len(batch)})
            results = [{"ErrorCode": type(exc).__name__}] * len(batch)
        for event, result in zip(batch, results):
            if result.get("EventId"):
                event.delete()
                sent += 1
            else:
                event.update(actions=[OutboxEvent.attempts.add(1),
                                      OutboxEvent.last_error.set(str(result.get("ErrorCode")))])
    return sent


def drain(limit: int = 500) -> int:
    """Publishes what earlier attempts could not (called by the reconciler)."""
    pending = list(OutboxEvent.pending.query(PENDING, limit=limit))
    # An event published meanwhile (by the change's own request, or a concurrent pass) is gone from the
    # table while the index still lists it: skipped, never a failed pass.
    events = [dynamo.get_or_none(OutboxEvent, e.event_id, what="outbox event") for e in pending]
    return publish([e for e in events if e is not None]) if pending else 0
