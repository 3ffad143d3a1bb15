"""A tiny per-process TTL cache: warm Lambda invocations skip repeated DynamoDB reads.
Bounded: past `max_items` the entry written longest ago goes (a Lambda's memory is fixed).

Refreshed ahead: an entry read in the last quarter of its life is served as it is and reloaded
in the background (one reload per key at a time), so a busy caller never waits for the reload
and a change is still seen within the TTL; an entry past its TTL is loaded by its reader."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class TTLCache:
    REFRESH_AT = 0.75        # of the TTL: reads after this point reload in the background

    def __init__(self, ttl_seconds: float, max_items: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl_seconds
        self._clock = clock
        self.max_items = max_items
        self._items: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._reloading: set = set()
        self._generation = 0                    # bumped by invalidate(): a reload begun before is dropped

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        now = self._clock()
        with self._lock:
            hit = self._items.get(key)
            ahead = bool(hit) and self.ttl * self.REFRESH_AT <= now - hit[0] < self.ttl \
                and key not in self._reloading
            if ahead:
                self._reloading.add(key)
            generation = self._generation
        if ahead:
            threading.Thread(target=self._reload, args=(key, load, generation), daemon=True,
                             name="cache-reload").start()
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        return self._store(key, load(), now)

    def _reload(self, key: Any, load: Callable[[], Any], generation: int) -> None:
        started = self._clock()
        try:
            self._store(key, load(), started, generation)
        except Exception:  # noqa: BLE001 - the entry stays until its TTL; its next reader loads it
            pass
        finally:
            with self._lock:
                self._reloading.discard(key)

    def _store(self, key: Any, value: Any, now: float, generation: int | None = None) -> Any:
        with self._lock:
            if generation is not None and generation != self._generation:
                return value                    # invalidated while it was being reloaded: not kept
            self._items.pop(key, None)          # re-inserted last: dicts keep insertion order
            self._items[key] = (now, value)
            while len(self._items) > self.max_items:
                del self._items[next(iter(self._items))]
        return value

    def invalidate(self, key: Any = None) -> None:
        with self._lock:
            self._generation += 1
            if key is None:
                self._items.clear()
            else:
                self._items.pop(key, None)
