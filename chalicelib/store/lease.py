"""The one lease: a conditional update that takes an item's work for a while.

An item is free in its `free` state, or taken (`taken`) with a lease that has run out; taking it sets
the state and the lease's end in one conditional write, so two workers never hold it at once and a
crashed holder's work is taken over when its lease ends. Used by the job worker's submission and
deferred preflight, and the eval worker's runs.
"""
from __future__ import annotations

from collections.abc import Sequence

from pynamodb.exceptions import UpdateError

from chalicelib.domain import ids
from chalicelib.store import dynamo


def take(item, state, until, *, free: str, taken: str, seconds: int, extra: Sequence = (),
         open_ended: bool = False, what: str | None = None) -> bool:
    """Takes `item` for `seconds` (True), or finds it held by someone else or done (False).
    `state`/`until`: the item's state and lease-end attributes; `extra`: more update actions in the
    same write; `open_ended`: a taken item without a lease end counts as expired; `what`: retry a
    busy DynamoDB within the request's time (dynamo.call), named so in its error."""
    now = ids.now()
    expired = until < now
    if open_ended:
        expired = until.does_not_exist() | expired
    actions = [state.set(taken), until.set(now + seconds), *extra]
    condition = (state == free) | ((state == taken) & expired)
    try:
        if what:
            dynamo.call(lambda: item.update(actions=actions, condition=condition), idempotent=False, what=what)
        else:
            item.update(actions=actions, condition=condition)
        return True
    except UpdateError as exc:
        if dynamo.is_condition(exc):
            return False
        raise
