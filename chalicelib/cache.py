"""A tiny per-process TTL cache: warm Lambda invocations skip repeated DynamoDB reads.
Bounded: past `max_items` the entry written longest ago goes (a Lambda's memory is fixed)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class TTLCache:
    def __init__(self, ttl_seconds: float, max_items: int = 4096) -> None:
        self.ttl = ttl_seconds
        self.max_items = max_items
        self._items: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._items.get(key)
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        value = load()
        with self._lock:
            self._items.pop(key, None)          # re-inserted last: dicts keep insertion order
            self._items[key] = (now, value)
            while len(self._items) > self.max_items:
                del self._items[next(iter(self._items))]
        return value

    def invalidate(self, key: Any = None) -> None:
        with self._lock:
            if key is None:
                self._items.clear()
            else:
                self._items.pop(key, None)
