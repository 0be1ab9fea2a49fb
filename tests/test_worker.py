"""The worker runtime: pools through the consumer group, registry, drain on SIGTERM, bad input."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis as sync_redis

from titan_broker import Client, ProcessManager
from titan_broker._wire.keys import GROUP, Keys
from titan_broker._wire.protocol import pack

from .conftest import CALCULATOR, SERVICES, Workers, raw_call, wait_until

pytestmark = pytest.mark.anyio


async def test_two_worker_processes_share_40_slow_calls(
    workers: Workers, redis_url: str, namespace: str
) -> None:
    for _ in range(2):
        workers.start(SERVICES / "slow.py", "--concurrency", "4")
    workers.wait_registered("slow", 2)
    async with Client(redis_url, namespace=namespace) as client:
        results: list[dict[str, int]] = []

        async def one(i: int) -> None:
            results.append(await client.call("slow", "sleep", (0.2, i)))

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(one, i)
        elapsed = time.monotonic() - started
        by_pid = Counter(r["pid"] for r in results)
        assert sorted(r["tag"] for r in results) == list(range(40))
        assert set(by_pid) == {p.pid for p in workers.procs}
        assert min(by_pid.values()) >= 10, by_pid  # an even split by pull, not one worker hoarding
        # No worker ever ran more than its 4 slots: it reads only what it can run.
        for _ in range(2):
            assert await client.call("slow", "max_concurrency") <= 4
        assert elapsed < 40 * 0.2 / 4  # faster than one worker's 4 slots could: both served at once


async def test_worker_registers_its_record_and_removes_it_on_exit(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    proc = workers.start(CALCULATOR)
    [wid] = workers.wait_registered("calculator", 1)
    record = {k.decode(): v.decode() for k, v in sync_client.hgetall(keys.worker("calculator", wid)).items()}
    assert record["service"] == "calculator"
    assert record["version"] == "1.0.0"
    assert record["pid"] == str(proc.pid)
    assert record["status"] == "ready"
    assert record["host"]
    methods = {m["name"]: m["signature"] for m in json.loads(record["methods"])}
    assert methods["add"] == "add(a: float, b: float) -> float"
    assert set(methods) == {"add", "subtract", "multiply", "divide", "power", "factorial", "get_stats"}
    assert json.loads(record["health"])["status"] == "healthy"
    ttl = sync_client.pttl(keys.worker("calculator", wid))
    assert 0 < ttl <= 5000
    # The heartbeat refreshes the record about every second.
    first = float(record["heartbeat_at"])
    wait_until(
        lambda: float(sync_client.hget(keys.worker("calculator", wid), "heartbeat_at") or 0) > first,
        timeout=5, what="a heartbeat",
    )  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not sync_client.exists(keys.worker("calculator", wid))
    assert not sync_client.sismember(keys.workers("calculator"), wid)


async def test_sigterm_drains_calls_in_flight_and_runs_on_shutdown(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, tmp_path: Path,
    sync_client: sync_redis.Redis,
) -> None:  # fmt: skip
    marker = tmp_path / "shutdown.txt"
    proc = workers.start(SERVICES / "slow.py", "--dep", f"marker={json.dumps(str(marker))}")
    workers.wait_registered("slow", 1)
    async with Client(redis_url, namespace=namespace) as client:
        results: list[dict[str, int]] = []

        async def one(i: int) -> None:
            results.append(await client.call("slow", "sleep", (1.0, i)))

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
            # All three are in the worker's hands (pending) before the signal.
            await anyio.to_thread.run_sync(
                lambda: wait_until(
                    lambda: sync_client.xpending(keys.calls("slow"), GROUP)["pending"] == 3,
                    what="3 pending calls",
                )
            )
            proc.send_signal(signal.SIGTERM)
        assert sorted(r["tag"] for r in results) == [0, 1, 2]
    assert await anyio.to_thread.run_sync(lambda: proc.wait(timeout=10)) == 0
    assert marker.read_text() == "shutdown after max 3\n"
    assert sync_client.xlen(keys.calls("slow")) == 0  # acknowledged entries are deleted


async def test_worker_exit_code_for_bad_file(workers: Workers) -> None:
    proc = workers.start(SERVICES / "two_processes.py")
    assert proc.wait(timeout=20) == 3
    assert b"2 @process classes found" in workers.output(proc)


async def test_worker_exit_code_when_redis_is_unreachable(workers: Workers) -> None:
    proc = workers.start(CALCULATOR, "--redis", "redis://127.0.0.1:1/0")
    assert proc.wait(timeout=20) == 4
    assert b"cannot reach Redis at redis://127.0.0.1:1/0" in workers.output(proc)


async def test_expired_call_is_dropped_without_running(pm: ProcessManager) -> None:
    slow = await pm.spawn(SERVICES / "slow.py")
    reply = await raw_call(pm, "slow", "sleep", (30,), deadline_in=-1)
    assert reply.error is not None
    assert reply.error["type"] == "titan.DeadlineExceeded"
    assert "dropped unrun" in reply.error["message"]
    assert await slow.max_concurrency() == 0  # it never ran


async def test_call_running_past_its_deadline_is_cancelled(pm: ProcessManager) -> None:
    await pm.spawn(SERVICES / "slow.py")
    started = time.monotonic()
    reply = await raw_call(pm, "slow", "sleep", (30,), deadline_in=0.3)
    assert reply.error is not None
    assert reply.error["type"] == "titan.DeadlineExceeded"
    assert "cancelled" in reply.error["message"]
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda f: f.update({b"v": b"99"}), "unsupported protocol version"),
        (lambda f: f.update({b"a": b"\xc1not msgpack"}), "not valid msgpack"),
        (lambda f: f.update({b"a": pack({"not": "a list"})}), "must be a msgpack array"),
        (lambda f: f.pop(b"m"), "no method name"),
        (lambda f: f.update({b"ttl": b"soon"}), "no valid timeout"),
    ],
)
async def test_malformed_entry_gets_an_error_reply_and_worker_keeps_serving(
    pm: ProcessManager, mutate: Callable[[dict[bytes, bytes]], object], expected: str
) -> None:
    calc = await pm.spawn(CALCULATOR)
    reply = await raw_call(pm, "calculator", "add", (1, 2), mutate=mutate)
    assert reply.error is not None
    assert reply.call_id == "raw-1"
    assert expected in reply.error["message"]
    assert await calc.add(2, 2) == 4


async def test_entry_without_reply_key_is_acknowledged_and_worker_keeps_serving(
    pm: ProcessManager, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    calc = await pm.spawn(CALCULATOR)
    redis = pm.client.redis
    await redis.xadd(keys.calls("calculator"), {b"junk": b"\x00\x01"})
    assert await calc.add(2, 3) == 5
    await anyio.to_thread.run_sync(
        lambda: wait_until(lambda: sync_client.xlen(keys.calls("calculator")) == 0, what="empty stream")
    )
    assert (await redis.xpending(keys.calls("calculator"), GROUP))["pending"] == 0


async def test_worker_pid_is_not_the_caller(pm: ProcessManager) -> None:
    slow = await pm.spawn(SERVICES / "slow.py")
    assert (await slow.sleep(0))["pid"] != os.getpid()
