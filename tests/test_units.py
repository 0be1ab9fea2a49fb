"""In-process unit tests of the small state machines: breaker, event bus, histogram, cache and bucket.

No Redis and no processes: time is a fake clock put in place of the module's
``time``, so edge cases (a probe after exactly ``reset_after``, a TTL just
passed) are exact and cost nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
from types import ModuleType
from typing import Any

import anyio
import pytest

# The worker-side cache and bucket: imported here only, so a move is a one-line change.
from titan_worker.middleware.cache import LocalCache
from titan_worker.middleware.rate_limit import LocalBucket

from titan_broker._calling import breaker as breaker_module
from titan_broker._calling.breaker import BreakerState, CircuitBreaker
from titan_broker._errors import (
    BacklogFull,
    BadArguments,
    CallTimeout,
    CircuitOpen,
    ConfigError,
    EncodeError,
    MethodNotFound,
    PayloadTooLarge,
    RateLimited,
    RedisUnavailable,
    RemoteError,
)
from titan_broker._processes.events import Event, EventBus
from titan_broker._registry.latency import BOUNDS, LatencyHistogram

CLOCKED: list[ModuleType] = [sys.modules[cls.__module__] for cls in (LocalCache, LocalBucket)]
"""The modules whose ``time`` the fake clock replaces (with the breaker's)."""


class FakeClock:
    """Stands in for the ``time`` module of the code under test: ``monotonic()`` moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    for module in (breaker_module, *CLOCKED):
        monkeypatch.setattr(module, "time", fake)
    return fake


# -- the circuit breaker -----------------------------------------------------------------------


def tripped(failures: int = 3, reset_after: float = 10.0) -> BreakerState:
    """A breaker that has just opened after ``failures`` timeouts in a row."""
    state = BreakerState(CircuitBreaker(failures=failures, reset_after=reset_after), "svc")
    for _ in range(failures):
        state.before_call()
        state.after_call(CallTimeout("no answer"))
    assert state.state == "open"
    return state


def test_breaker_opens_after_the_configured_failures_in_a_row(clock: FakeClock) -> None:
    state = BreakerState(CircuitBreaker(failures=3, reset_after=10), "svc")
    for _ in range(2):
        state.before_call()
        state.after_call(CallTimeout("no answer"))
    assert state.state == "closed"
    state.before_call()  # the third may still go
    state.after_call(RemoteError("ValueError", "boom"))  # an error the service raised counts
    assert state.state == "open"
    with pytest.raises(CircuitOpen, match="'svc' is open after 3 failed calls") as info:
        state.before_call()
    assert info.value.retry_after == pytest.approx(10.0)


def test_breaker_counts_only_failures_in_a_row(clock: FakeClock) -> None:
    state = BreakerState(CircuitBreaker(failures=2, reset_after=10), "svc")
    for _ in range(5):
        state.before_call()
        state.after_call(BacklogFull("full"))
        state.before_call()
        state.after_call(None)  # a success in between resets the count
    assert state.state == "closed" and state.failures == 0


@pytest.mark.parametrize(
    "mistake",
    [
        BadArguments("titan.BadArguments", "argument 'a' must be float"),
        MethodNotFound("titan.MethodNotFound", "no method"),
        RateLimited("titan.RateLimited", "limited", {"retry_after": 0.1}),
        PayloadTooLarge("titan.PayloadTooLarge", "too big"),
        EncodeError("titan.EncodeError", "cannot encode"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_breaker_ignores_the_callers_own_mistakes(clock: FakeClock, mistake: Exception) -> None:
    state = BreakerState(CircuitBreaker(failures=1, reset_after=10), "svc")
    for _ in range(10):
        state.before_call()
        state.after_call(mistake)
    assert state.state == "closed"
    state.before_call()
    state.after_call(RedisUnavailable("gone"))  # a real failure still opens it
    assert state.state == "open"


def test_breaker_mistakes_do_not_reset_the_failure_count(clock: FakeClock) -> None:
    state = BreakerState(CircuitBreaker(failures=2, reset_after=10), "svc")
    state.before_call()
    state.after_call(CallTimeout("no answer"))
    state.before_call()
    state.after_call(BadArguments("titan.BadArguments", "bad"))  # neither a success nor a failure
    state.before_call()
    state.after_call(CallTimeout("no answer"))
    assert state.state == "open"


def test_breaker_stays_open_until_reset_after(clock: FakeClock) -> None:
    state = tripped(reset_after=10)
    clock.advance(9.9)
    with pytest.raises(CircuitOpen) as info:
        state.before_call()
    assert info.value.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    assert state.state == "half-open"
    state.before_call()  # the probe goes


def test_breaker_lets_a_single_probe_through_while_half_open(clock: FakeClock) -> None:
    state = tripped()
    clock.advance(10)
    state.before_call()  # the probe
    assert state.state == "half-open"
    for _ in range(3):  # everyone else fails fast while the probe is out
        with pytest.raises(CircuitOpen):
            state.before_call()
    clock.advance(60)  # however long the probe takes
    with pytest.raises(CircuitOpen):
        state.before_call()


def test_breaker_successful_probe_closes_the_circuit(clock: FakeClock) -> None:
    state = tripped(failures=3)
    clock.advance(10)
    state.before_call()
    state.after_call(None)
    assert state.state == "closed" and state.failures == 0
    state.before_call()
    state.after_call(CallTimeout("no answer"))  # one failure does not re-open a closed circuit of 3
    assert state.state == "closed"


def test_breaker_failed_probe_reopens_for_a_full_reset_after(clock: FakeClock) -> None:
    state = tripped(reset_after=10)
    clock.advance(10)
    state.before_call()
    state.after_call(CallTimeout("still down"))
    assert state.state == "open"
    clock.advance(9.9)  # counted from the failed probe, not from the first opening
    with pytest.raises(CircuitOpen):
        state.before_call()
    clock.advance(0.1)
    state.before_call()  # the next probe
    assert state.state == "half-open"


def test_breaker_probe_ended_by_a_caller_mistake_frees_the_probe(clock: FakeClock) -> None:
    state = tripped()
    clock.advance(10)
    state.before_call()
    state.after_call(BadArguments("titan.BadArguments", "bad"))  # says nothing about the service
    assert state.state == "half-open"
    state.before_call()  # another probe may go; the circuit neither closed nor re-opened
    state.after_call(None)
    assert state.state == "closed"


def test_breaker_cancelled_probe_frees_the_probe(clock: FakeClock) -> None:
    state = tripped()
    clock.advance(10)
    state.before_call()
    state.after_call(asyncio.CancelledError())  # the caller gave up: no verdict
    state.before_call()
    assert state.state == "half-open"


@pytest.mark.parametrize(("failures", "reset_after"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_breaker_refuses_a_bad_configuration(failures: int, reset_after: float) -> None:
    with pytest.raises(ConfigError, match="failures >= 1 and reset_after > 0"):
        CircuitBreaker(failures=failures, reset_after=reset_after)


# -- the event bus -----------------------------------------------------------------------------


def event(kind: Any = "ready", n: int = 0) -> Event:
    return Event(kind, "svc", f"w{n}", 100 + n, f"detail {n}")


def test_a_raising_callback_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(e: Event) -> None:
        raise RuntimeError("observer bug")

    bus.on(lambda e: seen.append(f"first {e.worker_id}"))
    bus.on(broken)
    bus.on(lambda e: seen.append(f"last {e.worker_id}"))
    with caplog.at_level(logging.ERROR, logger="titan_broker.events"):
        bus.emit(event(n=1))
        bus.emit(event(n=2))
    assert seen == ["first w1", "last w1", "first w2", "last w2"]
    failures = [r for r in caplog.records if "event callback" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info is not None
    assert failures[0].exc_info[0] is RuntimeError


def test_unsubscribed_callback_is_not_called_again() -> None:
    bus = EventBus()
    seen: list[int | None] = []
    others: list[int | None] = []
    off = bus.on(lambda e: seen.append(e.pid))
    bus.on(lambda e: others.append(e.pid))
    bus.emit(event(n=1))
    off()
    bus.emit(event(n=2))
    assert seen == [101]
    assert others == [101, 102]


@pytest.mark.parametrize(
    ("kind", "level"),
    [("ready", logging.INFO), ("stopped", logging.INFO), ("crashed", logging.WARNING),
     ("failed", logging.WARNING), ("unhealthy", logging.WARNING)],
)  # fmt: skip
def test_every_event_is_logged_at_its_level(caplog: pytest.LogCaptureFixture, kind: str, level: int) -> None:
    bus = EventBus()
    with caplog.at_level(logging.DEBUG, logger="titan_broker.events"):
        bus.emit(event(kind, 3))
    [record] = [r for r in caplog.records if r.name == "titan_broker.events"]
    assert record.levelno == level
    assert record.getMessage() == f"{kind}: svc w3 (pid 103): detail 3"


@pytest.mark.anyio
async def test_a_slow_subscriber_loses_events_past_its_buffer_and_never_blocks_the_emitter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    events = bus.subscribe(buffer=2)
    received: list[str | None] = []

    async def take_one() -> None:
        received.append((await events.__anext__()).worker_id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take_one)
        await anyio.wait_all_tasks_blocked()  # the subscriber is registered and waiting
        bus.emit(event(n=0))
    assert received == ["w0"]
    # The subscriber now takes nothing: emit (not async: it cannot wait) must not raise either.
    with caplog.at_level(logging.WARNING, logger="titan_broker.events"):
        for n in range(1, 6):
            bus.emit(event(n=n))
    dropped = [r for r in caplog.records if "not keeping up" in r.getMessage()]
    assert len(dropped) == 3  # w3, w4, w5: the buffer holds 2
    for _ in range(2):
        await take_one()
    assert received == ["w0", "w1", "w2"]
    bus.emit(event(n=6))  # caught up: it receives again
    await take_one()
    assert received[-1] == "w6"
    await events.aclose()  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_closed_subscription_gets_nothing_and_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    events = bus.subscribe(buffer=1)
    async with anyio.create_task_group() as tg:

        async def first() -> None:
            assert (await events.__anext__()).worker_id == "w0"

        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        bus.emit(event(n=0))
    await events.aclose()  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="titan_broker.events"):
        for n in range(5):
            bus.emit(event(n=n))  # with the stream still registered, the second would warn
    assert not [r for r in caplog.records if "not keeping up" in r.getMessage()]


@pytest.mark.anyio
async def test_closing_the_bus_ends_every_subscription() -> None:
    bus = EventBus()
    got: list[str] = []

    async def listen() -> None:
        async for e in bus.subscribe():
            got.append(e.kind)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await anyio.wait_all_tasks_blocked()
            bus.emit(event("ready"))
            bus.emit(event("stopped"))
            await anyio.wait_all_tasks_blocked()
            bus.close()  # listen() returns: the task group can exit
    assert got == ["ready", "stopped"]


# -- the latency histogram ---------------------------------------------------------------------


def exact_quantile(values: list[float], q: float) -> float:
    """The smallest value with at least q of all values at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(round(q * len(ordered), 6)))  # round: no float noise in q * n
    return ordered[rank - 1]


def within_one_bucket(reported: float | None, true: float) -> bool:
    """A percentile is the upper bound of the bucket holding the true value: true <= reported < 1.25 true."""
    return reported is not None and true <= reported < true * 1.25


def test_histogram_percentiles_of_a_uniform_distribution() -> None:
    hist = LatencyHistogram()
    values = [ms / 1000 for ms in range(1, 1001)]  # 1 ms .. 1 s
    for v in random.Random(1).sample(values, len(values)):
        hist.observe(v)
    assert hist.count == 1000
    for q, true in ((0.5, 0.5), (0.95, 0.95), (0.99, 0.99)):
        assert within_one_bucket(hist.percentile(q), true), (q, hist.percentile(q))
    summary = hist.summary()
    assert set(summary) == {"p50", "p95", "p99"}
    assert 500 <= summary["p50"] < 625 and 950 <= summary["p95"] < 1187.5  # type: ignore[operator]
    assert summary["p50"] < summary["p95"] <= summary["p99"]  # type: ignore[operator]


def test_histogram_percentiles_see_the_tail_not_the_median() -> None:
    hist = LatencyHistogram()
    values = [0.002] * 90 + [0.3] * 8 + [2.0] * 2  # 90 % fast, a slow tail
    for v in values:
        hist.observe(v)
    for q in (0.5, 0.9, 0.95, 0.98, 0.99, 1.0):
        assert within_one_bucket(hist.percentile(q), exact_quantile(values, q)), q
    assert hist.percentile(0.9) < 0.0025  # type: ignore[operator]
    assert 0.3 <= hist.percentile(0.95) < 0.375  # type: ignore[operator]
    assert 2.0 <= hist.percentile(0.99) < 2.5  # type: ignore[operator]


def test_histogram_of_a_lognormal_sample_is_within_one_bucket() -> None:
    rng = random.Random(42)
    values = [rng.lognormvariate(-6, 1.5) for _ in range(20_000)]  # about 2.5 ms median, a long tail
    hist = LatencyHistogram()
    for v in values:
        hist.observe(v)
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        assert within_one_bucket(hist.percentile(q), exact_quantile(values, q)), q


def test_empty_histogram_has_no_percentiles() -> None:
    hist = LatencyHistogram()
    assert hist.percentile(0.5) is None
    assert hist.summary() == {"p50": None, "p95": None, "p99": None}
    assert hist.to_dict() == {}


def test_histogram_extremes_land_in_the_first_and_last_buckets() -> None:
    hist = LatencyHistogram()
    hist.observe(0.0)
    assert hist.percentile(1.0) == BOUNDS[0]
    hist.observe(10_000.0)  # beyond the largest bound: counted, reported as the largest bound
    assert hist.count == 2
    assert hist.percentile(1.0) == BOUNDS[-1]
    assert BOUNDS[-1] > 60


def test_merged_histograms_equal_one_histogram_of_all_values() -> None:
    rng = random.Random(7)
    parts = [[rng.expovariate(1 / scale) for _ in range(500)] for scale in (0.001, 0.01, 0.1)]
    separate = []
    for values in parts:
        hist = LatencyHistogram()
        for v in values:
            hist.observe(v)
        separate.append(hist)
    whole = LatencyHistogram()
    for values in parts:
        for v in values:
            whole.observe(v)
    merged = LatencyHistogram.merged(separate)
    assert merged.counts == whole.counts
    assert merged.summary() == whole.summary()
    assert [h.count for h in separate] == [500, 500, 500]  # merging changes none of its inputs
    everything = [v for values in parts for v in values]
    assert within_one_bucket(merged.percentile(0.99), exact_quantile(everything, 0.99))


def test_histogram_survives_its_sparse_json_form() -> None:
    hist = LatencyHistogram()
    for v in (0.001, 0.001, 0.02, 0.5):
        hist.observe(v)
    data = hist.to_dict()
    assert sum(data.values()) == 4 and len(data) == 3  # only non-empty buckets
    assert LatencyHistogram.from_dict(data).counts == hist.counts
    # A record from a newer worker with more buckets: unknown indexes are ignored, not a crash.
    assert LatencyHistogram.from_dict({**data, "999": 5, "-1": 5}).counts == hist.counts


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


def test_bucket_admits_a_burst_then_refuses_with_the_wait(clock: FakeClock) -> None:
    bucket = LocalBucket(rps=4, burst=3)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.25)  # one token every 1/4 s
    clock.advance(0.1)
    assert bucket.take() == pytest.approx(0.15)  # a refusal takes no token
    clock.advance(0.15)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.25)


def test_bucket_refills_at_its_rate_up_to_the_burst(clock: FakeClock) -> None:
    bucket = LocalBucket(rps=10, burst=2)
    bucket.take()
    bucket.take()
    clock.advance(3600)  # idle for an hour: still only a burst of 2
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]
    admitted = 0
    for _ in range(100):  # 10 s at 10/s, asking every 0.1 s
        clock.advance(0.1)
        admitted += bucket.take() == 0.0
    assert admitted == 100


def test_bucket_rate_over_a_long_run_is_the_configured_rate(clock: FakeClock) -> None:
    bucket = LocalBucket(rps=5, burst=1)
    admitted = 0
    for _ in range(10_000):  # 10 s of a caller asking every millisecond
        admitted += bucket.take() == 0.0
        clock.advance(0.001)
    assert 50 <= admitted <= 51  # 5/s for 10 s, plus the first token


# --- the codec's bounds ----------------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_decoding_accepts_the_deepest_nesting_allowed_and_refuses_one_more() -> None:
    from titan_broker._wire.codec import MAX_DEPTH, pack, unpack

    assert unpack(pack(nested(MAX_DEPTH))) == nested(MAX_DEPTH)
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} deep"):
        unpack(pack(nested(MAX_DEPTH + 1)))
    with pytest.raises(ValueError, match="nested more than"):  # maps count as much as arrays
        unpack(pack({"a": nested(MAX_DEPTH)}))


def test_depth_is_checked_on_the_counting_path_too() -> None:
    """A payload with more bytes that look like array and map headers than MAX_CONTAINERS is decoded by
    msgpack-python, which counts them; the depth limit holds there as well."""
    from titan_broker._wire.codec import MAX_CONTAINERS, MAX_DEPTH, pack, unpack

    filler = bytes([0x90]) * (MAX_CONTAINERS + 1)  # not containers: the bytes of a bin
    assert unpack(pack([filler, nested(MAX_DEPTH - 1)])) == [filler, nested(MAX_DEPTH - 1)]
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} deep"):
        unpack(pack([filler, nested(MAX_DEPTH)]))


def test_decoding_accepts_the_most_arrays_and_maps_allowed_and_refuses_one_more() -> None:
    from titan_broker._wire.codec import MAX_CONTAINERS, pack, unpack

    most = [{}] * (MAX_CONTAINERS - 1)  # and the list itself
    assert unpack(pack(most)) == most
    with pytest.raises(ValueError, match=f"more than {MAX_CONTAINERS} arrays and maps"):
        unpack(pack([*most, {}]))


def test_an_array_as_a_map_key_counts_for_the_depth() -> None:
    """msgspec decodes an array used as a map key into a tuple: it nests like any array."""
    from titan_broker._wire.codec import MAX_DEPTH, unpack

    key = b"\x91" * MAX_DEPTH + b"\x00"  # 64 arrays around 0, the key of a map in an array: 66 deep
    with pytest.raises(ValueError, match="nested more than"):
        unpack(b"\x91\x81" + key + b"\x00")
    # [{}, {key: 0}] with the key 62 arrays deep: 64 in all, allowed (65 headers: the depth is walked)
    assert unpack(b"\x92\x80\x81" + b"\x91" * (MAX_DEPTH - 2) + b"\x00\x00")


@pytest.mark.parametrize("path", ["msgspec", "counting"])
def test_unknown_extension_types_are_refused_on_both_paths(path: str) -> None:
    import msgpack

    from titan_broker._wire.codec import MAX_CONTAINERS, unpack

    filler = bytes([0x90]) * (MAX_CONTAINERS + 1) if path == "counting" else b""
    with pytest.raises(ValueError, match="unknown msgpack extension type 42"):
        unpack(msgpack.packb([filler, msgpack.ExtType(42, b"x")], use_bin_type=True))
