"""README promises that had no test: each test names the promise it holds the code to.

Real Redis, real worker processes; every wait is a polled condition with a bound.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest
import redis as sync_redis
from anyio.streams.buffered import BufferedByteReceiveStream

from titan_broker import (
    AutoScale,
    Client,
    DeadLettered,
    HealthStatus,
    ProcessManager,
    RestartPolicy,
    ServiceHealth,
    WorkerOptions,
)
from titan_broker._wire.keys import GROUP, Keys

from .conftest import CALCULATOR, CHAOS, FAST_FAILOVER, SERVICES, Workers, eventually, in_thread, wait_until
from .test_pools import POOLED, QUICK_HEALTH, Recorder

pytestmark = pytest.mark.anyio

SLOW = SERVICES / "slow.py"
DECORATED = SERVICES / "decorated.py"


def in_flight(client: sync_redis.Redis, keys: Keys, service: str) -> int:
    """Calls of ``service`` delivered to a worker and not yet settled."""
    return int(client.xpending(keys.calls(service), GROUP)["pending"])


# -- "Limits belong to the service ... @public(max_deliveries=1) for a call that must never run twice"


async def test_a_max_deliveries_1_call_is_dead_lettered_not_rerun_when_its_worker_dies(
    workers: Workers,
    redis_url: str,
    namespace: str,
    keys: Keys,
    sync_client: sync_redis.Redis,
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    procs = {p.pid: p for p in (workers.start(CHAOS, *FAST_FAILOVER) for _ in range(2))}
    workers.wait_registered("chaos", 2)
    async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
        outcome: list[BaseException | object] = []

        async def call() -> None:
            try:
                outcome.append(await client.call("chaos", "once", (str(runs), 3000), timeout=20))
            except DeadLettered as exc:
                outcome.append(exc)

        tg.start_soon(call)
        ran = await in_thread(wait_until, lambda: runs.exists() and runs.read_text(), 10, "the call to run")
        first = procs.pop(int(str(ran)))
        [second] = procs.values()  # the one that would run it again
        workers.kill(first)  # mid-call
    [result] = outcome
    assert isinstance(result, DeadLettered), result
    assert "delivered 2 times (max_deliveries 1)" in str(result)
    assert runs.read_text().splitlines() == [str(first.pid)]  # it ran once, on the worker that died
    [letter] = sync_client.xrange(keys.dead("chaos"))
    assert letter[1][b"m"] == b"once"
    assert second.poll() is None


# -- "--max-deliveries overrides the service's"


async def test_the_max_deliveries_flag_overrides_the_services_limit(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    # crash() says max_deliveries=2: two workers would die on it. The flag says 1: only one does.
    procs = [workers.start(CHAOS, *FAST_FAILOVER, "--max-deliveries", "1") for _ in range(2)]
    workers.wait_registered("chaos", 2)
    async with Client(redis_url, namespace=namespace) as client:
        with pytest.raises(DeadLettered, match=r"delivered 2 times \(max_deliveries 1\)"):
            await client.call("chaos", "crash", timeout=30)
    dead = [p for p in procs if p.poll() is not None]
    assert len(dead) == 1
    workers.killed.add(dead[0].pid)
    assert sync_client.hget(keys.config("chaos"), "max_deliveries") == b"1"


# -- the exit codes of titan-worker: 1 crashed, 5 init() raised


def test_worker_exits_5_when_init_raises(workers: Workers) -> None:
    proc = workers.start(SERVICES / "init_fails.py", "--dep", "dsn=sqlite://x")
    assert proc.wait(timeout=20) == 5
    out = workers.output(proc)
    assert b"init() raised RuntimeError: cannot open database 'sqlite://x'" in out
    assert b"init_fails.py" in out and b"Traceback" not in out


def test_worker_exits_1_when_it_crashes_on_an_unexpected_error(workers: Workers) -> None:
    with socket.socket() as taken:  # the metrics port is in use: nothing the worker could foresee
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        proc = workers.start(CALCULATOR, "--metrics-port", str(taken.getsockname()[1]))
        assert proc.wait(timeout=20) == 1
    out = workers.output(proc)
    assert b"titan-worker: crashed: OSError" in out, out


# -- "reply streams are trimmed by their reader and expire"


async def test_reply_stream_is_trimmed_by_its_reader_and_expires(pm: ProcessManager) -> None:
    slow = await pm.spawn(SLOW, options=WorkerOptions(reply_ttl=1.0))
    redis, reply_key = pm.client.redis, pm.client.keys.reply("slow", pm.client.client_id)
    for i in range(20):
        assert await slow.echo(i) == i
    assert 0 < await redis.pttl(reply_key) <= 1000

    async def trimmed() -> bool:
        return not await redis.exists(reply_key) or await redis.xlen(reply_key) == 0

    await eventually(trimmed, 5, "the read replies to be deleted")

    async def expired() -> bool:
        return not await redis.exists(reply_key)

    await eventually(expired, 5, "the idle reply stream to expire")
    assert await slow.echo("again") == "again"  # a new reply stream serves the next call


# -- "dead-letter streams are capped"


async def test_dead_letters_are_capped(pm: ProcessManager, keys: Keys) -> None:
    cap = 50
    await pm.spawn(CALCULATOR, options=WorkerOptions(dead_letter_maxlen=cap))
    redis = pm.client.redis
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(600):  # unanswerable entries: each one is dead-lettered
            pipe.xadd(keys.calls("calculator"), {b"junk": str(i).encode()})
        await pipe.execute()

    async def settled() -> bool:
        return await redis.xlen(keys.calls("calculator")) == 0

    await eventually(settled, 30, "the worker to dead-letter every entry")
    kept = await redis.xlen(keys.dead("calculator"))
    print(f"\n600 dead letters with dead_letter_maxlen={cap}: {kept} kept")
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): never below the cap,
    # at most one node over.
    assert cap <= kept <= cap + 100
    newest = await redis.xrevrange(keys.dead("calculator"), count=1)
    assert newest, "the newest dead letter is kept"


# -- "A worker whose record expired meanwhile registers again"


async def test_a_worker_whose_record_expired_registers_again(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    proc = workers.start(CALCULATOR, *FAST_FAILOVER)
    [wid] = workers.wait_registered("calculator", 1)
    record = keys.worker("calculator", wid)
    full = sync_client.hgetall(record)
    proc.send_signal(signal.SIGSTOP)  # no heartbeat: the record expires (TTL 1 s), nobody prunes the set
    try:
        await in_thread(wait_until, lambda: not sync_client.exists(record), 10, "the record to expire")
        assert sync_client.sismember(keys.workers("calculator"), wid)
    finally:
        proc.send_signal(signal.SIGCONT)

    def registered_again() -> dict[bytes, bytes]:
        again = sync_client.hgetall(record)
        return again if b"methods" in again else {}

    again = await in_thread(wait_until, registered_again, 10, "the worker to register again")
    for field in (b"service", b"version", b"pid", b"host", b"methods", b"concurrency", b"started_at"):
        assert again.get(field) == full[field], field
    titan = await anyio.run_process(
        [sys.executable, "-m", "titan_cli", "--redis", workers.url, "--namespace", workers.namespace,
         "workers", "calculator", "--json"], check=False,
    )  # fmt: skip
    [listed] = json.loads(titan.stdout)
    assert (listed["worker_id"], listed["pid"], listed["service"]) == (wid, proc.pid, "calculator")


# -- "pm.spawn() is a supervised pool of one"


async def test_a_spawned_worker_is_restarted_when_it_is_killed(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    svc = await pm.spawn(POOLED, restart=RestartPolicy(backoff=0.1))
    [worker] = pm.workers
    assert await svc.sleep(0) == worker.pid
    worker.process.kill()  # SIGKILL, as the OOM killer would
    [crashed] = await recorder.wait_for("crashed")
    [restarted] = await recorder.wait_for("restarted")
    assert crashed.pid == worker.pid and restarted.pid != worker.pid
    [replacement] = pm.workers
    assert replacement.pid == restarted.pid
    assert await svc.sleep(0) == replacement.pid


# -- "A worker whose manager dies (even by SIGKILL) drains and exits by itself"

MANAGER = """
import sys, anyio
from titan_broker import ProcessManager

async def main(url, namespace, path):
    async with ProcessManager(url, namespace=namespace) as pm:
        await pm.spawn(path)
        print("ready", flush=True)
        await anyio.sleep_forever()

anyio.run(main, *sys.argv[1:])
"""


async def test_a_worker_whose_manager_is_killed_finishes_its_call_then_exits(
    redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    manager = await anyio.open_process([sys.executable, "-c", MANAGER, redis_url, namespace, str(SLOW)],
                                       stderr=None)  # fmt: skip
    try:
        assert manager.stdout is not None
        with anyio.fail_after(30):
            assert await BufferedByteReceiveStream(manager.stdout).receive_until(b"\n", 1024) == b"ready"
        async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
            [wid] = [w.decode() for w in sync_client.smembers(keys.workers("slow"))]
            pid = int(sync_client.hget(keys.worker("slow", wid), "pid") or 0)
            answer: list[dict[str, int]] = []

            async def call() -> None:
                answer.append(await client.call("slow", "sleep", (5.0, 7), timeout=20))

            tg.start_soon(call)
            await in_thread(
                wait_until, lambda: in_flight(sync_client, keys, "slow") == 1, 10, "the call to run"
            )
            manager.kill()  # SIGKILL: the manager cannot stop its worker itself
            await manager.wait()

            def draining() -> bool:
                return sync_client.hget(keys.worker("slow", wid), "status") == b"draining"

            await in_thread(wait_until, draining, 5, "the orphan to start draining")
            assert answer == []  # it drains: the call in flight is still running
        assert answer == [{"pid": pid, "tag": 7}]  # answered by the orphan, not abandoned

        def gone() -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        await in_thread(wait_until, gone, 10, "the orphan to exit")
        assert not sync_client.exists(keys.worker("slow", wid))  # it deregistered on its way out
    finally:
        if manager.returncode is None:
            manager.kill()
        await manager.aclose()


# -- "a second signal stops at once (calls still running are left to other workers)"


async def test_a_second_signal_leaves_the_call_in_flight_to_another_worker(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    procs = {wid: workers.start(SLOW, *FAST_FAILOVER, "--grace", "60", "--worker-id", wid) for wid in "ab"}
    workers.wait_registered("slow", 2)
    async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
        answer: list[dict[str, int]] = []

        async def call() -> None:
            answer.append(await client.call("slow", "sleep", (3.0, 9), timeout=30))

        tg.start_soon(call)

        def taken_by() -> str | None:
            [entry] = sync_client.xpending_range(keys.calls("slow"), GROUP, "-", "+", 1) or [None]
            return entry["consumer"].decode() if entry else None

        holder = str(await in_thread(wait_until, taken_by, 10, "a worker to take the call"))
        first = procs.pop(holder)
        [other] = procs.values()
        first.send_signal(signal.SIGTERM)

        def draining() -> bool:
            return sync_client.hget(keys.worker("slow", holder), "status") == b"draining"

        await in_thread(wait_until, draining, 10, "the worker to drain")
        stopped_at = time.monotonic()
        first.send_signal(signal.SIGTERM)  # the second signal: stop now, not after the call (or 60 s)
        assert await in_thread(first.wait, 10) == 0
        assert time.monotonic() - stopped_at < 2.0
        assert answer == []  # it did not finish the call...
    assert answer == [{"pid": other.pid, "tag": 9}]  # ...the other worker took it over and answered


# -- "With only opentelemetry-api installed (no SDK configured) it costs nothing"

NO_SDK = '''
import importlib.abc
import sys


class NoSdk(importlib.abc.MetaPathFinder):
    """As if only opentelemetry-api were installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, NoSdk())
'''


async def test_tracing_with_only_the_opentelemetry_api_records_nothing(
    workers: Workers, pm: ProcessManager, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_SDK)  # runs first in the worker's interpreter
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    workers.start(DECORATED, env={"PYTHONPATH": path})
    workers.wait_registered("decorated", 1)
    svc = await pm.connect("decorated")
    assert await svc.traced() == "traced"  # @trace works without an SDK...
    assert await svc.trace_probe() == {"recording": False, "sdk_loaded": False}  # ...and records nothing


async def test_a_traced_call_is_recorded_once_an_sdk_is_configured(
    pm: ProcessManager, tmp_path: Path
) -> None:
    svc = await pm.spawn(DECORATED, dependencies={"spans": str(tmp_path / "spans.jsonl")})
    assert await svc.trace_probe() == {"recording": True, "sdk_loaded": True}  # the probe can tell


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


# -- "a check that raises or times out is unhealthy"


async def test_a_health_check_that_raises_makes_its_worker_unhealthy(
    pm: ProcessManager, tmp_path: Path
) -> None:
    pool = await pm.pool(POOLED, dependencies={"sick_dir": str(tmp_path)}, options=QUICK_HEALTH,
                         unhealthy_threshold=1000)  # fmt: skip
    pid = pool.workers[0].pid
    flag = tmp_path / f"{pid}.raise"
    flag.touch()

    async def health_is(status: HealthStatus) -> ServiceHealth | None:
        health = await pm.health("pooled")
        return health if health.status == status else None

    health = await eventually(lambda: health_is(HealthStatus.UNHEALTHY), 10, "an unhealthy service")
    [worker] = health.workers
    assert "health() raised ConnectionError: the database is gone" in worker["details"]["error"]
    assert await pool.proxy.sleep(0) == pid  # unhealthy, still serving
    flag.unlink()
    await eventually(lambda: health_is(HealthStatus.HEALTHY), 10, "the worker to recover")


# -- "degraded (some unhealthy or a failed slot)"


async def test_a_failed_slot_makes_the_service_degraded(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, size=2, restart=RestartPolicy(max_restarts=0, backoff=0.1))
    crashed = await pool.proxy.exit_soon()
    [failed] = await recorder.wait_for("failed")
    assert failed.pid == crashed and pool.failed == 1

    async def without_the_dead_worker() -> ServiceHealth | None:
        health = await pm.health("pooled")
        return (
            health if [w["pid"] for w in health.workers] != [crashed] and len(health.workers) == 1 else None
        )

    health = await eventually(without_the_dead_worker, 10, "the crashed worker to leave")
    assert (health.status, health.healthy, health.failed) == (HealthStatus.DEGRADED, 1, 1)


# -- "Events ... They are logged too (logger titan_broker._processes.events)"


async def test_lifecycle_events_are_logged(pm: ProcessManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="titan_broker.events")
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, restart=RestartPolicy(backoff=0.1))
    crashed = await pool.proxy.exit_soon()
    await recorder.wait_for("restarted")
    await pool.close()
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "titan_broker.events"]
    assert [str(e) for e in recorder.events] == [message for _level, message in logged]  # each one, once
    levels = {message.split(":")[0]: level for level, message in logged}
    assert levels == {"ready": "INFO", "crashed": "WARNING", "restarted": "INFO", "stopped": "INFO"}
    assert any(m.startswith("crashed: pooled ") and f"(pid {crashed})" in m for _l, m in logged)
