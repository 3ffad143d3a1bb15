"""The in-process bus for reactions between contexts: a lower context emits a domain event
(chalicelib/domain/events.py) and the handlers that chalicelib/wiring.py lists run, in order.

Handlers' exceptions propagate: the caller fails as it would have failed calling them, so a
request is refused with the handler's 400, and work the reconciler repeats (finalize) is repeated
until every handler has succeeded. Handlers are therefore idempotent. The outbox stays the only
way out to EventBridge; this bus never leaves the process.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

_table: dict[type, list[Callable[[Any], None]]] | None = None


def wire(table: dict[type, list[Callable[[Any], None]]]) -> None:
    """Once per process, from chalicelib/wiring.py (imported by app.py)."""
    global _table
    _table = {kind: list(handlers) for kind, handlers in table.items()}


def emit(event: Any) -> None:
    # Unwired means a function that never imported the wiring: failing loudly beats silently
    # skipping a reaction (an eval never run, an alias never given).
    if _table is None:
        raise RuntimeError("chalicelib.bus.emit before chalicelib.wiring was imported")
    for handler in _table.get(type(event), ()):
        handler(event)
