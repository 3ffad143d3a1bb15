"""The ledger: one entry per metered call, the record of truth, written exactly once.

A team's entries are spread over `shards()` partition keys (`<team>#<shard>`, the shard from a
hash of the request id), so a team's calls never all write one partition: on AWS a partition key
takes about 1,000 writes a second, so 16 shards carry a team well past 10,000 calls a second.
The sort key starts with the hold or slice the call was admitted against
(`<hold>#<unix ms>#<request id>`), so one slice's entries are one prefix query per shard.
A write that DynamoDB keeps refusing goes to a dead-letter queue, drained into the ledger by the
reconciler (`drain_dead_letters`); an entry that can never be written is parked for an operator.
A served call is always on the ledger or in one of those two queues.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from datetime import timedelta

from pynamodb.exceptions import PynamoDBException

from chalicelib import deadline
from chalicelib.adapters import aws, queues
from chalicelib.errors import ApiError
from chalicelib.log import logger
from chalicelib.store import dynamo
from chalicelib.store.models import LedgerEntry

_ENTRY_FIELDS = ("pk", "sort_key", "team_id", "request_id", "key_id", "model", "upstream_model", "alias", "endpoint",
                 "input_tokens", "cached_tokens", "output_tokens", "cost_micro", "reserved_micro", "latency_ms",
                 "status", "stream", "created_at", "kind", "outcome", "hold_id", "job_id", "key_hold_id")


def shards() -> int:
    """Set once per deployment: entries written under one count are looked up under the same."""
    return max(1, int(os.environ.get("RFT_LEDGER_SHARDS", "16")))


def retention_days() -> int:
    return int(os.environ.get("RFT_LEDGER_RETENTION_DAYS", "90"))


def ledger_dlq() -> str:
    return os.environ.get("RFT_LEDGER_DLQ", f"rfthub-{os.environ.get('RFT_STAGE', 'local')}-ledger-dlq")


def ledger_parked_queue() -> str:
    """FIFO, so a repeated park of the same entry (a DLQ delete that failed after parking, a
    standard queue's second delivery) is dropped by SQS's deduplication id."""
    return os.environ.get("RFT_LEDGER_PARKED",
                          f"rfthub-{os.environ.get('RFT_STAGE', 'local')}-ledger-parked.fifo")


# ---- keys ----------------------------------------------------------------------------------------

def partition(team_id: str, request_id: str) -> str:
    return f"{team_id}#{zlib.crc32(request_id.encode('utf-8', 'surrogatepass')) % shards():02d}"


def partitions(team_id: str) -> list[str]:
    return [f"{team_id}#{n:02d}" for n in range(shards())]


def new_entry(team_id: str, created_ms: int, request_id: str, hold_id: str | None, **fields) -> LedgerEntry:
    """An entry keyed for its team, hold and request: the same call always gets the same key, so
    a repeated write (a retry, a dead-letter replay) is a no-op."""
    return LedgerEntry(partition(team_id, request_id), f"{hold_id or '-'}#{int(created_ms):013d}#{request_id}",
                       team_id=team_id, request_id=request_id, hold_id=hold_id, created_at=int(created_ms) // 1000,
                       **fields)


# ---- reading -------------------------------------------------------------------------------------

def entries(team_id: str) -> list[LedgerEntry]:
    """Every entry of the team (one query per shard), oldest first. For reports and tests; the
    request path never reads the ledger."""
    found = [e for pk in partitions(team_id) for e in LedgerEntry.query(pk, consistent_read=True)]
    return sorted(found, key=lambda e: (e.sort_key.split("#", 1)[1], e.sort_key))


def entries_for_hold(team_id: str, hold_id: str) -> list[LedgerEntry]:
    """The entries of calls admitted against one hold or slice. `team_id` may be a key's budget
    owner (`<team>/key/<key id>`, spend/budgets.py): its slice is on the team's entries as
    `key_hold_id`, found by a filtered query of each shard (the reconciler's path, not a call's)."""
    team, sep, _ = team_id.partition("/key/")
    if sep:
        return [e for pk in partitions(team)
                for e in dynamo.call(lambda pk=pk: list(LedgerEntry.query(
                    pk, filter_condition=LedgerEntry.key_hold_id == hold_id, consistent_read=True)),
                    idempotent=True, what="ledger read")]
    return [e for pk in partitions(team_id)
            for e in dynamo.call(lambda pk=pk: list(LedgerEntry.query(
                pk, LedgerEntry.sort_key.startswith(f"{hold_id}#"), consistent_read=True)),
                idempotent=True, what="ledger read")]


# ---- writing -------------------------------------------------------------------------------------

def put(entry: LedgerEntry) -> None:
    """Idempotent: the entry is written once; a repeat finds it there and is a success."""
    entry.expires_at = timedelta(days=retention_days())
    entry.agg_team = entry.pk
    dynamo.put_once(entry, LedgerEntry.sort_key, "ledger write")


def write(entry: LedgerEntry) -> bool:
    """Puts the entry, or dead-letters it when DynamoDB keeps refusing (the reconciler writes it
    later). Never raises. True if it is on the ledger now."""
    try:
        put(entry)
        return True
    except (ApiError, PynamoDBException) as exc:
        _dead_letter(entry, exc)
        return False


def entry_json(entry: LedgerEntry) -> str:
    return json.dumps({f: getattr(entry, f) for f in _ENTRY_FIELDS}, separators=(",", ":"))


def _dead_letter(entry: LedgerEntry, exc: Exception) -> None:
    body = entry_json(entry)
    try:
        queues.send(ledger_dlq(), body)
        logger.warning("ledger write failed; entry dead-lettered", extra={"request_id": entry.request_id,
                                                                           "error": type(exc).__name__})
    except Exception:  # noqa: BLE001 - the last resort: the whole entry in the logs, for replay
        logger.error("ledger write and dead-letter both failed", extra={"ledger_entry": body})


# ---- the dead-letter queue -----------------------------------------------------------------------

# DynamoDB refuses these for the item itself (a number of more than 38 digits, a bad type):
# the same entry is refused on every attempt, so it is parked, never retried.
_PERMANENT_CODES = {"ValidationException", "SerializationException"}


class Unwritable(Exception):
    """A dead-lettered message that can never become a ledger entry."""


def entry_from(body: str) -> LedgerEntry:
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        team_id = data.pop("team_id")
        pk = data.pop("pk", None) or partition(team_id, data["request_id"])   # an entry from before shards
        return LedgerEntry(pk, data.pop("sort_key"), team_id=team_id, **data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:   # json's errors are ValueErrors
        raise Unwritable(f"unreadable entry: {type(exc).__name__}") from exc


def replay(body: str) -> LedgerEntry:
    """Writes one dead-lettered entry (idempotent: keyed by its call). Raises Unwritable when it
    never can be; any other exception is transient (the message waits for the next pass)."""
    entry = entry_from(body)
    try:
        put(entry)
    except PynamoDBException as exc:
        if dynamo.response_code(exc) in _PERMANENT_CODES:
            raise Unwritable(f"DynamoDB refused the entry: {dynamo.response_code(exc)}") from exc
        raise
    except (ValueError, TypeError) as exc:    # refused before sending (serialization): the same every time
        raise Unwritable(f"unserializable entry: {type(exc).__name__}") from exc
    return entry


def park(body: str, reason: str) -> None:
    """Into the parked queue (its depth alarms an operator), deduplicated by the body's hash so
    a park that is repeated (the DLQ delete failed, a second delivery or copy of the same
    entry) leaves one copy. SQS deduplicates for 5 minutes; a later repeat is a second copy
    of the same entry, whose replay is idempotent (keyed by its call)."""
    queues.send(ledger_parked_queue(), body, MessageGroupId="ledger",
                MessageDeduplicationId=hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest(),
                MessageAttributes={"reason": {"DataType": "String", "StringValue": reason[:256]}})


def drain_dead_letters(max_messages: int = 500, on_written=None) -> dict:
    """Writes dead-lettered entries into the ledger (reconciler), each message on its own:
    written -> `on_written(entry)` (settles a per-call hold) and deleted; a transient failure ->
    left for the next pass (only that message; it is invisible until then, so this pass goes on
    with the rest); never writable (a validation error, an unreadable body) -> parked and deleted."""
    sqs = aws.sqs()
    url = queues.url(ledger_dlq())
    report = {"written": 0, "parked": 0, "left": 0}
    seen = 0
    while seen < max_messages and deadline.remaining() > 2.0:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not messages:
            break
        for message in messages:
            seen += 1
            body = message.get("Body", "")
            try:
                try:
                    entry = replay(body)
                    if on_written is not None:
                        try:
                            on_written(entry)
                        except (ApiError, PynamoDBException):
                            # On the ledger now: the reconciler settles its hold from it.
                            logger.warning("dead-letter replay: settlement deferred", extra={"hold_id": entry.hold_id})
                    outcome = "written"
                except Unwritable as exc:
                    park(body, str(exc))
                    logger.error("ledger entry parked: it can never be written", extra={
                        "message_id": message["MessageId"], "reason": str(exc), "queue": ledger_parked_queue()})
                    outcome = "parked"
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            except Exception as exc:  # noqa: BLE001 - transient (a park too): this one waits, the rest go on
                # A failed delete after a write or a park is harmless: both repeat idempotently.
                logger.warning("dead-letter replay failed; retried next pass", extra={
                    "message_id": message["MessageId"], "error": type(exc).__name__})
                report["left"] += 1
                continue
            report[outcome] += 1
    return report


def dlq_empty() -> bool:
    """No dead-lettered entry waiting or in flight: a slice may then be closed from the ledger
    (none of its calls is still on its way there). SQS's counts are approximate: a message sent
    in the last moments may not show yet, which is why slices are closed only well after their
    last call could have ended (spend/slices.py)."""
    attrs = aws.sqs().get_queue_attributes(QueueUrl=queues.url(ledger_dlq()), AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return all(int(v) == 0 for v in attrs.values())
