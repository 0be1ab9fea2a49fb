"""Pools: size and balance, scaling, supervision, recycling, health, discovery and events."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import psutil
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from titan_broker import (
    AutoScale,
    ConfigError,
    HealthStatus,
    Pool,
    PoolMetrics,
    ProcessManager,
    RestartPolicy,
    ServiceHealth,
    WorkerOptions,
)
from titan_broker._calling.client import ROUTE_TTL
from titan_broker.testing import LocalRedis

from .conftest import (
    CALCULATOR,
    FAST_FAILOVER,
    POOLED,
    QUICK_HEALTH,
    ROOT,
    Recorder,
    Workers,
    eventually,
)

pytestmark = pytest.mark.anyio


async def test_pool_starts_its_workers_and_every_one_serves(pm: ProcessManager) -> None:
    pool = await pm.pool(POOLED, size=3, concurrency=2)
    assert pool.size == 3
    assert len({w.pid for w in pool.workers}) == 3
    async with anyio.create_task_group() as tg:
        pids: list[int] = []

        async def one() -> None:
            pids.append(await pool.proxy.sleep(0.3))

        for _ in range(12):
            tg.start_soon(one)
    assert Counter(pids).keys() == {w.pid for w in pool.workers}
    # Counts come with the workers' heartbeats (about every second).
    metrics = await eventually(lambda: _with_calls(pool, 12), 5, "12 calls in the metrics")
    assert (metrics.workers, metrics.calls, metrics.errors, metrics.failed) == (3, 12, 0, 0)
    # Every call took 0.3 s: all three percentiles in the bucket of 0.3 s or a little above.
    assert metrics.p50_ms is not None and metrics.p95_ms is not None and metrics.p99_ms is not None
    assert 300 <= metrics.p50_ms <= metrics.p95_ms <= metrics.p99_ms <= 1000
    assert metrics.rss > 0


async def test_pool_percentiles_show_the_slow_tail(pm: ProcessManager) -> None:
    pool = await pm.pool(POOLED, size=2, concurrency=16)
    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(pool.proxy.sleep, 0.4 if i % 10 == 0 else 0)  # 10 % slow
    metrics = await eventually(lambda: _with_calls(pool, 100), 10, "100 calls in the metrics")
    assert metrics.p50_ms is not None and metrics.p95_ms is not None and metrics.p99_ms is not None
    print(f"\np50 {metrics.p50_ms} ms, p95 {metrics.p95_ms} ms, p99 {metrics.p99_ms} ms")
    assert metrics.p50_ms < 100  # the median is a quick call...
    assert 400 <= metrics.p95_ms <= metrics.p99_ms <= 2000  # ...p95 and p99 are the slow ones


async def _unhealthy(pm: ProcessManager, service: str) -> ServiceHealth | None:
    health = await pm.health(service)
    return health if health.status == HealthStatus.UNHEALTHY else None


async def _with_calls(pool: Pool[Any], calls: int) -> PoolMetrics | None:
    metrics = await pool.metrics()
    return metrics if metrics.calls >= calls else None


async def test_a_busy_worker_does_not_hold_up_calls_an_idle_one_can_take(pm: ProcessManager) -> None:
    pool = await pm.pool(POOLED, size=2, concurrency=1)
    async with anyio.create_task_group() as tg:
        busy: list[int] = []

        async def long_call() -> None:
            busy.append(await pool.proxy.sleep(3))

        tg.start_soon(long_call)
        await eventually(lambda: _running(pm, "pooled", 1), 10, "the long call to run")
        quick = [await pool.proxy.sleep(0.01) for _ in range(10)]
        assert busy == [], "the quick calls waited for the busy worker"
    assert len(set(quick)) == 1 and quick[0] != busy[0]


async def _running(pm: ProcessManager, service: str, count: int) -> bool:
    """True once ``count`` calls of ``service`` are in workers' hands (delivered, not yet answered)."""
    summary = await pm.client.redis.xpending(pm.client.keys.calls(service), "workers")
    return int(summary["pending"]) >= count


async def test_scale_up_and_down_without_failing_calls_in_flight(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, size=1, concurrency=4)
    await pool.scale(3)
    assert (pool.size, len(pool.workers)) == (3, 3)
    async with anyio.create_task_group() as tg:
        answers: list[int] = []

        async def one() -> None:
            answers.append(await pool.proxy.sleep(1.0))

        for _ in range(9):
            tg.start_soon(one)
        await eventually(lambda: _running(pm, "pooled", 9), 10, "9 calls running")
        await pool.scale(1)  # drains two workers while their calls run
    assert len(answers) == 9
    assert (pool.size, len(pool.workers)) == (1, 1)
    assert [e.detail for e in recorder.events if e.kind == "scaled"] == ["1 -> 3 workers", "3 -> 1 workers"]
    assert recorder.kinds().count("stopped") == 2 and "crashed" not in recorder.kinds()


async def test_autoscale_grows_under_backlog_and_shrinks_when_idle(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    scale = AutoScale(min=1, max=3, target_cpu=0.9, target_backlog=2, interval=0.3, cooldown=1.0)
    pool = await pm.pool(POOLED, autoscale=scale, concurrency=2)
    assert pool.size == 1
    failures: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def one() -> None:
            try:
                await pool.proxy.sleep(0.4)
            except Exception as exc:
                failures.append(exc)

        for _ in range(60):
            tg.start_soon(one)
    assert failures == []
    grown = [e.detail for e in recorder.events if e.kind == "scaled"]
    assert "2 -> 3 workers" in grown, grown
    await recorder.wait_for("stopped", count=2, timeout=20)  # idle: back down to min
    with anyio.fail_after(10):
        while pool.size != 1:
            await recorder._changed.wait()
    assert "crashed" not in recorder.kinds()


def test_target_cpu_above_one_is_refused_with_a_message() -> None:
    with pytest.raises(ConfigError, match=r"fraction of one CPU between 0 and 1 \(0.7 means 70 %\), got 70"):
        AutoScale(target_cpu=70)


async def test_crashed_worker_is_restarted_with_exponential_backoff(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, restart=RestartPolicy(max_restarts=5, window=60, backoff=0.3))
    first = await pool.proxy.exit_soon()
    [restarted] = await recorder.wait_for("restarted")
    assert "after 0.30 s" in restarted.detail
    second = await pool.proxy.exit_soon()
    restarts = await recorder.wait_for("restarted", count=2)
    assert "after 0.60 s" in restarts[1].detail  # doubled
    crashed = [e for e in recorder.events if e.kind == "crashed"]
    assert [e.pid for e in crashed] == [first, second]
    assert "exit code 3" in crashed[0].detail
    assert await pool.proxy.sleep(0) not in (first, second)


async def test_restarts_stop_after_the_limit_and_the_slot_is_marked_failed(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, restart=RestartPolicy(max_restarts=1, window=60, backoff=0.1))
    await pool.proxy.exit_soon()
    await recorder.wait_for("restarted")
    await pool.proxy.exit_soon()
    [failed] = await recorder.wait_for("failed")
    assert "max_restarts 1" in failed.detail
    assert pool.failed == 1 and pool.size == 0
    # The dead worker's record was cleared at once, not at its TTL.
    health = await eventually(lambda: _unhealthy(pm, "pooled"), 2, "an unhealthy service")
    assert health.failed == 1 and health.workers == []
    assert (await pool.metrics()).failed == 1


async def test_worker_recycled_after_n_calls_with_its_replacement_started_first(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, recycle_after_calls=5)
    old = [await pool.proxy.sleep(0) for _ in range(5)]
    [recycled] = await recorder.wait_for("recycled")
    assert "served 5 calls" in recycled.detail
    assert recycled.pid == old[0]
    kinds = recorder.kinds()
    assert kinds.index("ready") < kinds.index("recycled")  # the replacement was ready first
    await recorder.wait_for("stopped")
    assert await pool.proxy.sleep(0) != old[0]


async def test_worker_recycled_when_its_memory_passes_the_limit(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, memory_limit=150 * 2**20)
    hog = await pool.proxy.hog(200)
    [recycled] = await recorder.wait_for("recycled")
    assert recycled.pid == hog and "over the limit of 150 MiB" in recycled.detail
    await recorder.wait_for("stopped")
    assert await pool.proxy.sleep(0) != hog


async def test_unhealthy_worker_is_replaced(pm: ProcessManager, tmp_path: Path) -> None:
    recorder = Recorder(pm)
    pool = await pm.pool(
        POOLED, size=2, dependencies={"sick_dir": str(tmp_path)}, options=QUICK_HEALTH, unhealthy_threshold=2
    )
    sick = pool.workers[0].pid
    (tmp_path / str(sick)).touch()
    [event] = await recorder.wait_for("unhealthy")
    assert event.pid == sick and "2 failed health checks in a row" in event.detail
    await recorder.wait_for("stopped")
    assert sick not in {w.pid for w in pool.workers} and len(pool.workers) == 2


async def test_health_aggregates_every_worker(pm: ProcessManager, tmp_path: Path) -> None:
    pool = await pm.pool(POOLED, size=2, dependencies={"sick_dir": str(tmp_path)}, options=QUICK_HEALTH,
                         unhealthy_threshold=1000)  # fmt: skip
    healthy = await pm.health("pooled")
    assert healthy.status == HealthStatus.HEALTHY and healthy.healthy == 2
    (tmp_path / str(pool.workers[0].pid)).touch()

    async def degraded() -> ServiceHealth | None:
        health = await pm.health("pooled")
        return health if health.status == HealthStatus.DEGRADED else None

    health = await eventually(degraded, 10, "a degraded service")
    statuses = {w["pid"]: w["status"] for w in health.workers}
    assert statuses == {pool.workers[0].pid: "unhealthy", pool.workers[1].pid: "healthy"}
    assert health.to_dict()["healthy"] == 1
    assert (await pm.health("ghost")).status == HealthStatus.UNHEALTHY


async def test_events_can_be_iterated(pm: ProcessManager) -> None:
    seen: list[str] = []

    async def listen(task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        events = pm.subscribe()
        task_status.started()
        async for event in events:
            seen.append(event.kind)
            if event.kind == "stopped":
                break

    async with anyio.create_task_group() as tg:
        await tg.start(listen)
        await anyio.lowlevel.checkpoint()
        pool = await pm.pool(POOLED)
        await pool.close()
    assert seen == ["ready", "stopped"]


async def test_dead_worker_leaves_discovery_within_its_ttl(
    pm: ProcessManager, workers: Workers, redis_url: str
) -> None:
    proc = workers.start(CALCULATOR, *FAST_FAILOVER)
    workers.wait_registered("calculator", 1)
    assert [s.name for s in await pm.services()] == ["calculator"]
    workers.kill(proc)
    started = time.monotonic()

    async def gone() -> bool:
        return not await pm.workers_of("calculator")

    await eventually(gone, 5, "the dead worker to leave discovery")
    assert time.monotonic() - started < 2.5  # TTL 1 s
    assert await pm.services() == []
    assert await pm.client.redis.smembers(pm.client.keys.workers("calculator")) == set()


async def test_two_managers_in_separate_processes_see_each_other(
    pm: ProcessManager, redis_url: str, namespace: str
) -> None:
    other = await anyio.open_process(
        [sys.executable, str(ROOT / "tests" / "other_host.py"), redis_url, namespace], stderr=None
    )
    assert other.stdout is not None and other.stdin is not None
    lines = BufferedByteReceiveStream(other.stdout)

    async def readline() -> str:
        with anyio.fail_after(30):
            return (await lines.receive_until(b"\n", 65536)).decode()

    try:
        assert await readline() == "ready"
        services = {s.name: s for s in await pm.services()}
        assert "calculator" in services
        [worker] = services["calculator"].workers
        assert services["calculator"].hosts == {worker.host: 1}
        assert "add(a: float, b: float) -> float" in [m["signature"] for m in services["calculator"].methods]
        calc = await pm.connect("calculator")
        assert await calc.add(20, 22) == 42
        await pm.pool(POOLED)
        await other.stdin.send(b"look\n")
        seen = json.loads(await readline())
        assert sorted(seen) == ["calculator", "pooled"]
        await other.stdin.aclose()  # the other host shuts down its workers and exits
        with anyio.fail_after(30):
            assert await other.wait() == 0
        assert [s.name for s in await pm.services()] == ["pooled"]
    finally:
        if other.returncode is None:
            other.kill()
        await other.aclose()


async def test_workers_stop_when_their_manager_dies(redis_url: str, namespace: str) -> None:
    other = await anyio.open_process(
        [sys.executable, str(ROOT / "tests" / "other_host.py"), redis_url, namespace], stderr=None
    )
    try:
        assert other.stdout is not None
        line = await BufferedByteReceiveStream(other.stdout).receive_until(b"\n", 1024)
        assert line == b"ready"
        async with ProcessManager(redis_url, namespace=namespace) as pm:
            [worker] = await pm.workers_of("calculator")
            other.kill()  # SIGKILL: the manager cannot stop its workers itself
            await other.wait()

            async def gone() -> bool:
                return not await pm.workers_of("calculator")

            await eventually(gone, 10, "the orphaned worker to stop")
            with contextlib.suppress(psutil.NoSuchProcess):  # gone already is fine too
                await anyio.to_thread.run_sync(psutil.Process(worker.pid).wait, 10)
    finally:
        if other.returncode is None:
            other.kill()
        await other.aclose()


async def test_calls_with_a_key_stick_to_one_worker_and_move_when_it_is_gone(pm: ProcessManager) -> None:
    pool = await pm.pool(POOLED, size=3, restart=None)
    owner: dict[str, int] = {}
    for user in range(12):
        keyed = pool.proxy.with_options(key=f"user-{user}")
        pids = {await keyed.sleep(0) for _ in range(4)}
        assert len(pids) == 1, f"user-{user} was served by {pids}"
        owner[f"user-{user}"] = pids.pop()
    assert len(set(owner.values())) >= 2  # keys spread over the workers
    gone = owner["user-0"]
    victim = next(w for w in pool.workers if w.pid == gone)
    victim.process.kill()
    await victim.process.wait()
    # The dead worker's keys are served elsewhere at once; the others keep their worker.
    assert await pool.proxy.with_options(key="user-0", timeout=10).sleep(0) != gone
    kept = {key: pid for key, pid in owner.items() if pid != gone}

    async def served_by_their_owner() -> bool:
        return all([await pool.proxy.with_options(key=key).sleep(0) == pid for key, pid in kept.items()])

    # The client refreshes its view of the workers every ROUTE_TTL; then every key is home again.
    await eventually(served_by_their_owner, ROUTE_TTL + 5, "the surviving keys back on their workers")


async def test_calls_waiting_for_a_dead_worker_are_rescued(
    workers: Workers, redis_url: str, namespace: str
) -> None:
    # The worker to freeze keeps its record 5 s after its last beat: long enough to be sent calls.
    frozen = workers.start(
        POOLED, "--heartbeat-ttl", "5", "--heartbeat-interval", "0.25", "--worker-id", "frozen"
    )
    other = workers.start(POOLED, *FAST_FAILOVER, "--worker-id", "other")
    workers.wait_registered("pooled", 2)
    async with ProcessManager(redis_url, namespace=namespace) as pm:
        proxy = await pm.connect("pooled")
        for key in (f"user-{n}" for n in range(50)):
            if await proxy.with_options(key=key).sleep(0) == frozen.pid:
                break
        else:
            raise AssertionError("no key maps to the worker to freeze")
        frozen.send_signal(signal.SIGSTOP)  # alive to the registry, holding its calls, reading nothing
        answers: list[int] = []
        async with anyio.create_task_group() as tg:

            async def one() -> None:
                answers.append(await proxy.with_options(key=key, timeout=20).sleep(0))

            for _ in range(3):
                tg.start_soon(one)

            async def waiting_for_the_frozen_worker() -> bool:
                return await pm.client.redis.xlen(pm.client.keys.worker_calls("pooled", "frozen")) == 3

            await eventually(waiting_for_the_frozen_worker, 10, "3 calls on the frozen worker's own stream")
            workers.kill(frozen)
        assert answers == [other.pid] * 3


async def test_worker_recycled_after_its_maximum_lifetime(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, max_lifetime=1.0)
    first = pool.workers[0].pid
    [recycled] = await recorder.wait_for("recycled", timeout=10)
    assert recycled.pid == first and "limit 1 s" in recycled.detail
    stopped = await recorder.wait_for("stopped", timeout=10)
    assert stopped[0].pid == first
    assert first not in {w.pid for w in pool.workers} and pool.workers  # replaced, not just stopped
    assert await pool.proxy.sleep(0) != first


async def test_a_health_check_that_hangs_counts_as_unhealthy(pm: ProcessManager, tmp_path: Path) -> None:
    options = WorkerOptions(health_interval=0.2, health_timeout=0.3)
    pool = await pm.pool(POOLED, dependencies={"sick_dir": str(tmp_path)}, options=options,
                         unhealthy_threshold=1000)  # fmt: skip
    (tmp_path / f"{pool.workers[0].pid}.hang").touch()
    health = await eventually(lambda: _unhealthy(pm, "pooled"), 10, "an unhealthy service")
    assert "took longer than 0.3 s" in health.workers[0]["details"]["error"]
    assert await pool.proxy.sleep(0) == pool.workers[0].pid  # the worker still serves calls


async def test_every_worker_option_reaches_a_spawned_worker(pm: ProcessManager) -> None:
    options = WorkerOptions(metrics_port=0, heartbeat_ttl=7.0, read_block=0.3)
    pool = await pm.pool(POOLED, options=options, concurrency=3)
    [worker] = pool.workers
    record = await pm.client.redis.hgetall(pm.client.keys.worker("pooled", worker.worker_id))
    assert int(record[b"metrics_port"]) > 0  # metrics_port had no flag from pm.spawn before
    assert record[b"concurrency"] == b"3"
    assert 5000 < await pm.client.redis.pttl(pm.client.keys.worker("pooled", worker.worker_id)) <= 7000


# -- "Autoscale samples the pool's CPU ... adds a worker when either is above target"
async def test_autoscale_adds_a_worker_when_cpu_alone_is_above_target(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    # The backlog target is far away (one call in flight against 100): only the CPU can trigger.
    scale = AutoScale(min=1, max=2, target_cpu=0.25, target_backlog=100, interval=0.3, cooldown=60)
    pool = await pm.pool(POOLED, autoscale=scale)
    grown = anyio.Event()

    async def burn() -> None:
        while not grown.is_set():
            await pool.proxy.spin(0.5)  # one core busy in a worker thread

    async with anyio.create_task_group() as tg:
        tg.start_soon(burn)
        [scaled] = await recorder.wait_for("scaled", timeout=20)
        grown.set()
    assert scaled.detail == "1 -> 2 workers"
    assert pool.size == 2 and len(pool.workers) == 2


async def test_a_pool_scales_down_while_redis_is_down(aof_redis: LocalRedis) -> None:
    """Which worker is least busy is read from Redis; with Redis out of reach the pool still
    shrinks (any worker drains) rather than fail with a raw connection error."""
    async with ProcessManager(aof_redis.url, namespace="scale-down") as pm:
        pool = await pm.pool(POOLED, size=2)
        aof_redis.stop(kill=True)
        try:
            with anyio.fail_after(60):
                await pool.scale(1)
            assert (pool.size, len(pool.workers)) == (1, 1)
        finally:
            aof_redis.start()


async def test_a_pool_says_once_that_redis_is_out_of_reach_and_when_it_is_back(
    aof_redis: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage is one warning line (no traceback every second), and its end another."""

    pool_log = "titan_broker._processes.pool"
    seen = {"cannot reach Redis": anyio.Event(), "reaches Redis again": anyio.Event()}

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            for text, event in seen.items():
                if text in record.getMessage():
                    event.set()

    def lines(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == pool_log and text in r.getMessage()]

    async def until(text: str) -> None:
        with anyio.fail_after(20):
            await seen[text].wait()

    logging.getLogger(pool_log).addHandler(watch := Watch())
    caplog.set_level(logging.INFO, logger=pool_log)
    try:
        await outage(aof_redis, until)
    finally:
        logging.getLogger(pool_log).removeHandler(watch)
    (warning,) = lines("cannot reach Redis")
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert "monitor step failed" not in caplog.text


async def outage(redis: LocalRedis, until: Callable[[str], Awaitable[None]]) -> None:
    """A pool's Redis down for a few of its monitor's steps, then back."""
    async with ProcessManager(redis.url, namespace="outage") as pm:
        await pm.pool(POOLED, size=1)
        redis.stop(kill=True)
        try:
            await until("cannot reach Redis")
            await anyio.sleep(2.5)  # the monitor's next steps, each failing again
        finally:
            redis.start()
        await until("reaches Redis again")
