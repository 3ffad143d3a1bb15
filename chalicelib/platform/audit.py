"""The audit log (issue #29): one entry per security-relevant act, written in the SAME DynamoDB
transaction as the change it records, so there is no change without its entry and no entry
without its change; append-only (a conditional put of a new entry id; the functions' IAM denies
UpdateItem and DeleteItem on the table, deploy/template.py); each entry is also an outbound event
(`rft-hub.audit.recorded`, staged in the outbox in that same transaction).

Who acted and under which request come from the request being served: api/http.py's `route`
wraps every view in `acting(...)`, so a module deep below (budgets, prices, promotion) records the
right actor without it being threaded through its signature. Outside a request: "system".

Two ways to record:
* `commit(act, change, ...)`: runs the changes (callables given the TransactWrite) and the entry
  as one transaction, retried while DynamoDB is busy, applied once;
* `transact_put(tx, act)`: adds the entry (and its event) to a transaction the caller runs; the
  caller then calls `published(event)` after the commit.
"""
from __future__ import annotations

import contextlib
import contextvars
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pynamodb.exceptions import TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib import outbox
from chalicelib.domain import ids, numbers
from chalicelib.errors import InvalidRequest
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import AuditEntry, OutboxEvent, connection

LOG = "audit"
DETAIL_TYPE = "rft-hub.audit.recorded"
SYSTEM = "system"
MAX_SECONDS = 9_999_999_998       # since/until: ms keep 13 digits, so entry ids compare as times

# The acts recorded (docs/controls.md lists them with their targets).
ACTIONS = (
    "team.created", "key.created", "key.rotated", "key.revoked",
    "budget.set", "price.set", "price.deleted", "limit.set", "guardrail.attached", "guardrail.detached",
    "lambda_grader.registered", "lambda_grader.unregistered",
    "gate.set", "alias.override", "model.released",
    "console.signed_in", "console.signed_out",
)

_acting: contextvars.ContextVar[tuple[str, str | None]] = contextvars.ContextVar("rft_audit_actor",
                                                                                 default=(SYSTEM, None))


def actor_of(principal) -> str:
    """How an entry names who acted: the admin, a team key, or a console session (and its key)."""
    if principal is None:
        return SYSTEM
    session = getattr(principal, "session_id", None)
    who = "admin" if principal.is_admin else f"key:{principal.key_id}"
    return f"console:{session}/{who}" if session else who


@contextlib.contextmanager
def acting(principal, request_id: str | None) -> Iterator[None]:
    token = _acting.set((actor_of(principal), request_id))
    try:
        yield
    finally:
        _acting.reset(token)


def set_actor(principal) -> None:
    """Names the actor once a request's principal is known (inside `acting`)."""
    _acting.set((actor_of(principal), _acting.get()[1]))


def current_actor() -> tuple[str, str | None]:
    return _acting.get()


@dataclass(frozen=True)
class Act:
    action: str
    target: str
    team_id: str | None = None
    before: Any = None
    after: Any = None
    actor: str | None = None          # None: the request's (acting)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown audit action {self.action!r}")


def new_entry_id(now_ms: int | None = None) -> str:
    return f"aud_{now_ms if now_ms is not None else ids.now_ms():013d}_{secrets.token_hex(6)}"


def entry_for(act: Act) -> AuditEntry:
    actor, request_id = _acting.get()
    now_ms = ids.now_ms()
    return AuditEntry(LOG, new_entry_id(now_ms), created_at=now_ms // 1000, action=act.action,
                      actor=act.actor or actor, target=act.target, team_id=act.team_id, before=act.before,
                      after=act.after, request_id=request_id)


def view(entry: AuditEntry) -> dict:
    return {"id": entry.entry_id, "object": "audit.entry", "created_at": entry.created_at, "action": entry.action,
            "actor": entry.actor, "target": entry.target, "team_id": entry.team_id, "before": entry.before,
            "after": entry.after, "request_id": entry.request_id}


def transact_put(tx: TransactWrite, act: Act | AuditEntry) -> OutboxEvent:
    """Adds `act`'s entry, conditional on being new, and its outbound event to `tx`. After the
    transaction commits, call `published(event)` with what this returns."""
    entry = act if isinstance(act, AuditEntry) else entry_for(act)
    tx.save(entry, condition=AuditEntry.entry_id.does_not_exist())
    event = outbox.stage(DETAIL_TYPE, entry.team_id, event_id=f"evt-{entry.entry_id}",
                         **{k: v for k, v in view(entry).items() if k not in ("object", "team_id")})
    tx.save(event, condition=OutboxEvent.event_id.does_not_exist())
    return event


def published(*events: OutboxEvent) -> None:
    """Sends the staged events on (a failure leaves them in the outbox for the reconciler)."""
    outbox.publish(list(events))


def _exists(entry: AuditEntry) -> bool:
    return dynamo.get_or_none(AuditEntry, LOG, entry.entry_id, what="audit entry", consistent_read=True) is not None


def commit(act: Act, *changes: Callable[[TransactWrite], Any], what: str) -> AuditEntry:
    """The changes and the entry, one transaction. Retried while DynamoDB is busy or silent: a
    repeat after an unknown outcome is told apart by the entry itself (its id is new to this call,
    so if it exists the transaction was applied, all of it). A change's own condition failing
    raises TransactWriteError for the caller to read (`dynamo.is_condition`); nothing is written."""
    entry = entry_for(act)
    attempted = False
    staged: list[OutboxEvent] = []

    def once() -> None:
        nonlocal attempted
        again, attempted = attempted, True
        try:
            with TransactWrite(connection=connection()) as tx:
                for change in changes:
                    change(tx)
                staged[:] = [transact_put(tx, entry)]
        except TransactWriteError as exc:
            if again and dynamo.is_condition(exc) and _exists(entry):
                return         # the earlier attempt was applied; this one only found its entry
            raise

    dynamo.call(once, idempotent=True, what=what)
    published(*staged)
    return entry


def snapshot(item, fields: tuple[str, ...]) -> dict | None:
    """Some attributes of a model instance (None: no item), as an entry's before/after."""
    if item is None:
        return None
    return {f: getattr(item, f) for f in fields if getattr(item, f, None) is not None}


def save(item, *, action: str, target: str, team_id: str | None, fields: tuple[str, ...], before_item=None,
         condition=None, what: str) -> AuditEntry:
    """`item.save(condition=...)` and its entry, one transaction: the shape of an admin setting that
    replaces a row (a budget, a price, a limit). `before_item`: the row it replaces (None: new)."""
    act = Act(action, target, team_id, before=snapshot(before_item, fields), after=snapshot(item, fields))
    return commit(act, lambda tx: tx.save(item, condition=condition), what=what)


def delete(item, *, action: str, target: str, team_id: str | None, fields: tuple[str, ...], condition=None,
           what: str) -> AuditEntry:
    """`item.delete(condition=...)` and its entry, one transaction (a price override removed)."""
    act = Act(action, target, team_id, before=snapshot(item, fields))
    return commit(act, lambda tx: tx.delete(item, condition=condition), what=what)


# ---- reading ------------------------------------------------------------------------------------------

def _time_bound(value: str | None, name: str) -> int | None:
    if value in (None, ""):
        return None
    seconds = numbers.query_int(value, 0, MAX_SECONDS)
    if seconds is None:
        raise InvalidRequest(f"Query parameter '{name}' must be a unix time in seconds.", param=name)
    return seconds


def list_entries(*, team_id: str | None, limit: int, after: str | None = None, action: str | None = None,
                 actor: str | None = None, target: str | None = None, since: str | None = None,
                 until: str | None = None) -> dict:
    """A page of entries, newest first: every entry (team_id None) or one team's. Filters: `action`
    (exact, or a prefix ending in '.': `key.`), `actor`, `target` (exact), `since`/`until` (unix s)."""
    lo, hi = _time_bound(since, "since"), _time_bound(until, "until")
    index = "by_team" if team_id else None
    hash_value = team_id or LOG
    attr = AuditEntry.entry_id
    range_condition = None
    if lo is not None or hi is not None:
        lo, hi = lo or 0, hi if hi is not None else MAX_SECONDS
        if lo > hi:
            return pagination.envelope([], None, first_last=None)
        range_condition = attr.between(f"aud_{lo * 1000:013d}", f"aud_{(hi + 1) * 1000:013d}")
    conditions = []
    if action:
        conditions.append(AuditEntry.action.startswith(action) if action.endswith(".")
                          else AuditEntry.action == action)
    if actor:
        conditions.append(AuditEntry.actor == actor)
    if target:
        conditions.append(AuditEntry.target == target)
    filter_condition = None
    for condition in conditions:
        filter_condition = condition if filter_condition is None else filter_condition & condition

    def anchor(entry_id: str):
        found = dynamo.get_or_none(AuditEntry, LOG, entry_id, what="audit entry")
        return found if found is not None and (team_id is None or found.team_id == team_id) else None

    start = pagination.resume_at(after, AuditEntry, hash_value=hash_value, index=index, anchor=anchor)
    if start is pagination.NOWHERE:
        return pagination.envelope([], None, first_last=None)
    page = pagination.query(AuditEntry, hash_value, limit=limit, start=start, index=index,
                            range_key_condition=range_condition, filter_condition=filter_condition,
                            page_size=100 if filter_condition is not None else None, what="audit list")
    return pagination.envelope([view(e) for e in page.items], page, first_last=None)
