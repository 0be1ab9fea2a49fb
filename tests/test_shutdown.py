"""Shutdown: SIGTERM drains within the grace period, a second signal stops at once."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest
import redis as sync_redis

from titan_broker import (
    Client,
)
from titan_broker._wire.keys import GROUP, Keys
from titan_broker._wire.protocol import encode_request

from .conftest import (
    FAST_FAILOVER,
    SERVICES,
    Workers,
    in_thread,
    run_log_dep,
    wait_until,
)
from .worker_harness import (
    EDGE,
    pending,
    runs,
    send,
)

pytestmark = pytest.mark.anyio


SLOW = SERVICES / "slow.py"


def test_second_sigterm_stops_without_waiting_for_the_grace_period(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    proc = workers.start(SERVICES / "slow.py", "--grace", "60")
    workers.wait_registered("slow", 1)

    sync_client.xadd(
        keys.calls("slow"), encode_request("c", "sleep", (30,), {}, keys.reply("slow", "x"), 60_000)
    )  # type: ignore[arg-type]
    wait_until(lambda: pending(sync_client, keys, "slow"), 10, "the worker to take the call")
    started = time.monotonic()
    [wid] = workers.wait_registered("slow", 1)
    proc.send_signal(signal.SIGTERM)
    # Two signals sent back to back may merge into one: send the second once the first shows.
    wait_until(lambda: sync_client.hget(keys.worker("slow", wid), "status") == b"draining", 10, "draining")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5


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


# --- a thread blocked in a plain def does not hold the shutdown ------------------------------
def test_sigterm_does_not_wait_for_a_blocked_thread_past_the_grace_period(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    proc = workers.start(EDGE, "--grace", "1", *run_log_dep(log))
    workers.wait_registered("edge", 1)
    send(sync_client, keys, "edge", "hang", (60.0,), deadline_in=120)
    wait_until(lambda: runs(log, "hang"), 15, "the thread running")
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker was still running 20 s after SIGTERM with --grace 1")
    elapsed = time.monotonic() - started
    assert elapsed < 1 + 5 + 1, f"exit took {elapsed:.1f} s with --grace 1"
