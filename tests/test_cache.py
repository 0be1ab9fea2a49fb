"""The worker's local cache for @cache: generations, LRU eviction, TTLs (a fake clock)."""

from __future__ import annotations

from titan_worker.middleware.cache import LocalCache

from .conftest import FakeClock


# -- the worker's local cache and token bucket -------------------------------------------------
def test_cache_returns_what_was_put_under_the_same_generation(clock: FakeClock) -> None:
    cache = LocalCache(maxsize=4)
    assert cache.get("k", b"0") == (False, None)
    cache.put("k", {"v": 1}, ttl=5, generation=b"0")
    assert cache.get("k", b"0") == (True, {"v": 1})
    cache.put("none", None, ttl=5, generation=b"0")
    assert cache.get("none", b"0") == (True, None)  # a cached None is a hit, not a miss


def test_cache_evicts_the_least_recently_used(clock: FakeClock) -> None:
    cache = LocalCache(maxsize=2)
    cache.put("a", 1, ttl=60, generation=b"0")
    cache.put("b", 2, ttl=60, generation=b"0")
    assert cache.get("a", b"0") == (True, 1)  # a is now the most recently used
    cache.put("c", 3, ttl=60, generation=b"0")
    assert cache.get("b", b"0") == (False, None)
    assert cache.get("a", b"0") == (True, 1)
    assert cache.get("c", b"0") == (True, 3)


def test_cache_put_of_a_known_key_refreshes_it(clock: FakeClock) -> None:
    cache = LocalCache(maxsize=2)
    cache.put("a", 1, ttl=60, generation=b"0")
    cache.put("b", 2, ttl=60, generation=b"0")
    cache.put("a", 10, ttl=60, generation=b"0")  # a again: newest, not a third entry
    cache.put("c", 3, ttl=60, generation=b"0")
    assert cache.get("a", b"0") == (True, 10)
    assert cache.get("b", b"0") == (False, None)


def test_cache_entry_expires_after_its_ttl(clock: FakeClock) -> None:
    cache = LocalCache(maxsize=4)
    cache.put("k", "v", ttl=2.0, generation=b"0")
    clock.advance(2.0)
    assert cache.get("k", b"0") == (True, "v")  # at the TTL: still valid
    clock.advance(0.001)
    assert cache.get("k", b"0") == (False, None)
    clock.advance(-1)  # gone for good, not hidden
    assert cache.get("k", b"0") == (False, None)


def test_cache_entry_of_another_generation_is_a_miss_and_is_dropped(clock: FakeClock) -> None:
    cache = LocalCache(maxsize=4)
    cache.put("k", "old", ttl=60, generation=b"3")
    assert cache.get("k", b"4") == (False, None)  # invalidated since
    assert cache.get("k", b"3") == (False, None)  # dropped, not kept for the old generation
    cache.put("k", "new", ttl=60, generation=b"4")
    assert cache.get("k", b"4") == (True, "new")
