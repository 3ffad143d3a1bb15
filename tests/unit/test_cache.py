"""The per-process TTL cache (chalicelib/cache.py): refreshed ahead without making a reader wait."""
import threading

from chalicelib.cache import TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_read_late_in_an_entrys_life_is_served_at_once_and_reloaded_behind():
    clock = Clock()
    cache, loads, release = TTLCache(20, clock=clock), [], threading.Event()

    def slow():
        loads.append(1)
        release.wait(5)
        return len(loads)

    assert cache.get("k", lambda: 0) == 0
    clock.now = 16                                     # past 3/4 of its life, not past it
    assert cache.get("k", slow) == 0                   # the cached value, not held up by the reload
    assert cache.get("k", slow) == 0 and loads == [1]  # one reload at a time
    release.set()
    for thread in threading.enumerate():
        if thread.name == "cache-reload":
            thread.join(5)
    assert cache.get("k", lambda: -1) == 1             # the reloaded value


def test_an_invalidation_during_a_reload_wins():
    clock = Clock()
    cache, release, started = TTLCache(20, clock=clock), threading.Event(), threading.Event()

    def stale():
        started.set()
        release.wait(5)
        return "stale"

    cache.get("k", lambda: "old")
    clock.now = 16
    cache.get("k", stale)
    assert started.wait(5)
    cache.invalidate("k")                              # a change made in this process
    release.set()
    for thread in threading.enumerate():
        if thread.name == "cache-reload":
            thread.join(5)
    assert cache.get("k", lambda: "fresh") == "fresh"  # the reload begun before it is dropped


def test_an_expired_entry_is_loaded_by_its_reader():
    clock = Clock()
    cache = TTLCache(20, clock=clock)
    cache.get("k", lambda: 1)
    clock.now = 21
    assert cache.get("k", lambda: 2) == 2
