"""@cache, @rate_limit, @metric and @trace do what they say, across workers; the circuit breaker."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from titan_broker import (
    CallTimeout,
    CircuitBreaker,
    CircuitOpen,
    ConfigError,
    Pool,
    ProcessManager,
    RateLimited,
    RemoteError,
    cache,
    process,
    public,
)
from titan_broker._service.definition import describe

from .conftest import CALCULATOR, SERVICES, eventually

pytestmark = pytest.mark.anyio

DECORATED = SERVICES / "decorated.py"


async def test_cache_hit_then_expiry(pm: ProcessManager) -> None:
    svc = await pm.spawn(DECORATED)
    before_first = time.monotonic()
    assert await svc.square(3) == await svc.square(3)
    assert (await svc.run_counts())["square"] == 1  # the second was a hit

    async def ran_again() -> bool:
        await svc.square(3)
        return bool((await svc.run_counts())["square"] == 2)

    await eventually(ran_again, 5, "the cached result to expire")
    assert time.monotonic() - before_first >= 0.5  # kept for its whole ttl of 0.5 s
    await svc.square(4)  # other arguments, another entry
    assert (await svc.run_counts())["square"] == 3


async def test_errors_are_not_cached(pm: ProcessManager) -> None:
    svc = await pm.spawn(DECORATED)
    for attempt in (1, 2):
        with pytest.raises(RemoteError, match=f"failure number {attempt}"):
            await svc.fails()


async def test_service_scope_cache_is_shared_by_all_workers(pm: ProcessManager) -> None:
    pool: Pool[object] = await pm.pool(DECORATED, size=3, concurrency=1)
    results = []
    async with anyio.create_task_group() as tg:

        async def one() -> None:
            results.append(await pool.proxy.shared(41))

        await one()  # computed once...
        for _ in range(30):
            tg.start_soon(one)  # ...and served to every worker's callers from Redis
    assert len({json.dumps(r) for r in results}) == 1
    assert results[0]["value"] == 42


async def test_worker_cache_is_invalidated_everywhere_by_an_update(
    pm: ProcessManager, tmp_path: Path
) -> None:
    store, log = tmp_path / "users.json", tmp_path / "runs.log"
    pool: Pool[object] = await pm.pool(
        DECORATED, size=2, dependencies={"store": str(store), "runs": str(log)}
    )
    # One affinity key per worker, so each worker's cache is exercised for sure.
    home: dict[int, Any] = {}
    for k in range(50):
        keyed = pool.proxy.with_options(key=f"k{k}")
        home.setdefault((await keyed.square(k))["pid"], keyed)
        if len(home) == 2:
            break
    assert len(home) == 2, "no key found for one of the workers"

    def runs() -> Counter[int]:
        return (
            Counter(int(line.split()[1]) for line in log.read_text().splitlines())
            if log.exists()
            else Counter()
        )

    await pool.proxy.update_user(1, "ada")
    for _ in range(3):
        for proxy in home.values():
            assert (await proxy.get_user(1))["name"] == "ada"
    assert runs() == dict.fromkeys(home, 1)  # each worker ran it once; the rest were hits
    await pool.proxy.update_user(1, "grace")
    for _ in range(3):
        for proxy in home.values():
            assert (await proxy.get_user(1))["name"] == "grace"  # never the stale user
    assert runs() == dict.fromkeys(home, 2)  # dropped in both workers, each ran it once more
    await pool.proxy.delete_user(1)
    for proxy in home.values():
        assert await proxy.get_user(1) is None
    assert runs() == dict.fromkeys(home, 3)


async def test_explicit_invalidation(pm: ProcessManager) -> None:
    svc = await pm.spawn(DECORATED)
    await svc.shared(1)
    await svc.shared(1)
    assert (await svc.run_counts())["shared"] == 1
    await pm.client.invalidate_cache("decorated", "shared")
    await svc.shared(1)
    await svc.shared(1)
    assert (await svc.run_counts())["shared"] == 2  # ran again once, then cached again


def test_invalidated_by_must_name_public_methods() -> None:
    @process(name="bad")
    class Bad:
        @public
        @cache(ttl=1, invalidated_by=["nope"])
        async def get(self) -> int:
            return 1

    with pytest.raises(ConfigError, match="names nope, which is not @public"):
        describe(Bad)


async def test_service_rate_limit_holds_across_three_workers(pm: ProcessManager) -> None:
    pool: Pool[object] = await pm.pool(DECORATED, size=3)
    admitted = 0
    refusals: list[RateLimited] = []
    window = 4.0
    started = time.monotonic()

    async def hammer() -> None:
        nonlocal admitted
        while time.monotonic() - started < window:
            try:
                await pool.proxy.limited()
                admitted += 1
            except RateLimited as exc:
                refusals.append(exc)
                await anyio.sleep(min(exc.retry_after, 0.05))

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(hammer)
    elapsed = time.monotonic() - started  # every admission happened within it
    print(f"\nrate limit 10/s over 3 workers: {admitted} admitted in {elapsed:.2f} s = "
          f"{admitted / elapsed:.2f}/s, {len(refusals)} refused")  # fmt: skip
    # Never more than the bucket allows (burst 1, then 10/s), however fast or slow the machine;
    # and not starved: callers retrying every 50 ms at most get most of the rate.
    assert admitted <= 1 + 10 * elapsed
    assert admitted >= 0.8 * 10 * window
    assert refusals and all(0 < r.retry_after <= 0.1 for r in refusals)


async def until_refused(call: Any, limit: int = 50) -> tuple[int, RateLimited, float]:
    """Call until refused: (calls admitted, the refusal, seconds taken); fail if none is refused."""
    started = time.monotonic()
    for admitted in range(limit):
        try:
            await call()
        except RateLimited as exc:
            return admitted, exc, time.monotonic() - started
    raise AssertionError(f"{limit} calls in a row were admitted")


async def test_rate_limit_refuses_at_once_and_per_key(pm: ProcessManager) -> None:
    svc = await pm.spawn(DECORATED)
    admitted, refusal, elapsed = await until_refused(lambda: svc.per_user("a"))
    assert 2 <= admitted <= 2 + 2 * elapsed  # the burst of 2, then 2/s: whatever the machine's speed
    assert refusal.type == "titan.RateLimited" and 0 < refusal.retry_after <= 0.5  # not queued: told to retry
    assert "limited to 2 calls/s (service scope)" in refusal.message
    assert await svc.per_user("b") == "b"  # another key, another bucket
    admitted, refusal, elapsed = await until_refused(svc.worker_limited)
    assert 1 <= admitted <= 1 + 5 * elapsed
    assert "worker scope" in refusal.message


async def test_metrics_served_to_prometheus_and_summarised_in_the_registry(
    pm: ProcessManager, workers: object, redis_url: str, namespace: str
) -> None:
    from .conftest import Workers

    assert isinstance(workers, Workers)
    workers.start(DECORATED, "--metrics-port", "0")
    [wid] = workers.wait_registered("decorated", 1)
    svc = await pm.connect("decorated")
    for _ in range(3):
        await svc.measured()
    with pytest.raises(RemoteError, match="RuntimeError: asked to fail") as info:
        await svc.measured(True)
    assert type(info.value) is RemoteError and info.value.type == "RuntimeError"  # the service's own error

    async def summary() -> dict[str, object] | None:
        [info] = await pm.workers_of("decorated")
        record = await pm.client.redis.hgetall(pm.client.keys.worker("decorated", wid))
        data = json.loads(record[b"metrics"]).get("measured")
        return data if data and data["calls"] == 4 and info else None

    measured = await eventually(summary, 5, "the metrics summary")
    assert measured["errors"] == 1 and measured["p50"] is not None
    port = int((await pm.client.redis.hget(pm.client.keys.worker("decorated", wid), "metrics_port")) or 0)
    text = await anyio.to_thread.run_sync(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    assert 'titan_calls_total{method="measured",service="decorated"} 4.0' in text
    assert 'titan_call_errors_total{method="measured",service="decorated"} 1.0' in text
    assert 'titan_call_duration_seconds_count{method="measured",service="decorated"} 4.0' in text


async def test_worker_span_is_a_child_of_the_caller_span(pm: ProcessManager, tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    svc = await pm.spawn(DECORATED, dependencies={"spans": str(spans_file)})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        assert await svc.traced() == "traced"
    caller_ctx = caller.get_span_context()

    async def worker_spans() -> list[dict[str, object]]:
        if not spans_file.exists():
            return []
        return [json.loads(line) for line in spans_file.read_text().splitlines()]

    [span] = await eventually(worker_spans, 5, "the worker's span")
    assert span["name"] == "decorated.traced" and span["kind"] == "SERVER"
    assert span["trace_id"] == caller_ctx.trace_id
    assert span["parent_id"] == caller_ctx.span_id


async def test_untraced_calls_send_no_context_and_need_no_sdk(pm: ProcessManager) -> None:
    svc = await pm.spawn(DECORATED)
    assert await svc.traced() == "traced"


async def test_circuit_breaker_opens_fails_fast_and_closes_after_a_probe(pm: ProcessManager) -> None:
    ghost = (await pm.connect("ghost", breaker=CircuitBreaker(failures=2, reset_after=1.0))).with_options(
        timeout=0.2
    )
    for _ in range(2):
        with pytest.raises(CallTimeout):
            await ghost.add(1, 2)
    assert ghost.circuit == "open"
    stream = pm.client.keys.calls("ghost")
    last_sent = (await pm.client.redis.xinfo_stream(stream))["last-generated-id"]
    started = time.monotonic()
    with pytest.raises(CircuitOpen, match="open after 2 failed calls"):
        await ghost.add(1, 2)
    assert time.monotonic() - started < 0.2  # failed faster than a sent call could time out
    assert (await pm.client.redis.xinfo_stream(stream))["last-generated-id"] == last_sent  # not sent
    await pm.spawn(CALCULATOR, name="ghost")
    await eventually(lambda: _async(ghost.circuit == "half-open"), 5, "reset_after to pass")
    assert time.monotonic() - started >= 1.0 - 0.05  # open for reset_after
    assert await ghost.with_options(timeout=5).add(1, 2) == 3  # the probe
    assert ghost.circuit == "closed"


async def _async(value: object) -> object:
    return value


async def test_caller_mistakes_do_not_trip_the_breaker(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR, breaker=CircuitBreaker(failures=1, reset_after=60))
    from titan_broker import BadArguments

    for _ in range(3):
        with pytest.raises(BadArguments):
            await calc.add("x", 1)
    assert await calc.add(1, 1) == 2


async def test_a_sync_method_does_not_block_async_calls(pm: ProcessManager) -> None:
    svc = await pm.spawn(DECORATED)
    async with anyio.create_task_group() as tg:
        finished: dict[str, float] = {}

        async def block() -> None:
            finished["blocking"] = await svc.blocking(1.5)

        async def quick(i: int) -> None:
            finished[f"quick{i}"] = await svc.slow_async(0.05)

        tg.start_soon(block)

        async def blocking_started() -> bool:
            summary = await pm.client.redis.xpending(pm.client.keys.calls("decorated"), "workers")
            return int(summary["pending"]) == 1

        await eventually(blocking_started, 10, "the blocking call to start")
        for i in range(5):
            tg.start_soon(quick, i)
    # Worker-side clocks (one monotonic clock per machine): the quick calls ended first.
    assert all(finished[f"quick{i}"] < finished["blocking"] for i in range(5)), finished


def test_decorators_are_listed_with_their_options() -> None:
    from titan_broker._service.definition import load_service_file

    methods = {m: spec.describe() for m, spec in load_service_file(DECORATED).methods.items()}
    assert methods["get_user"]["decorators"] == {
        "cache": {
            "ttl": 30,
            "scope": "worker",
            "maxsize": 1024,
            "invalidated_by": ["update_user", "delete_user"],
        }
    }
    assert methods["per_user"]["decorators"]["rate_limit"]["key"] == "Decorated.<lambda>"
    assert methods["get_user"]["signature"] == "get_user(uid: int) -> dict[str, typing.Any] | None"
