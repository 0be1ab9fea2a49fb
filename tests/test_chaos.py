"""Chaos: thousands of calls while workers are SIGKILLed and Redis restarts; every call answered once."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest
import redis as sync_redis

from titan_broker import Client, RedisUnavailable
from titan_broker.keys import GROUP, Keys
from titan_broker.local_redis import LocalRedis

from .conftest import CHAOS, FAST_FAILOVER, Workers

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


class Load:
    """Callers that each take the next call number until ``total`` calls have been answered."""

    def __init__(self, client: Client, total: int, *, retry_unavailable: bool = False) -> None:
        self.client = client
        self.total = total
        self.retry_unavailable = retry_unavailable
        self.next = 0
        self.answers: Counter[int] = Counter()
        self.wrong: list[tuple[int, object]] = []
        self.slowest = 0.0
        self.refused = 0
        self.milestones: list[tuple[int, anyio.Event]] = []

    def reached(self, fraction: float) -> anyio.Event:
        """An event set once ``fraction`` of the calls have been answered."""
        event = anyio.Event()
        self.milestones.append((int(fraction * self.total), event))
        return event

    async def caller(self) -> None:
        rng = random.Random()
        while self.next < self.total:
            i = self.next
            self.next += 1
            while True:
                started = time.monotonic()
                try:
                    value, _pid = await self.client.call("chaos", "work", (i, rng.uniform(0, 20)), timeout=60)
                except RedisUnavailable:
                    if not self.retry_unavailable:
                        raise
                    self.refused += 1
                    await anyio.sleep(0.05)
                    continue
                break
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.answers[i] += 1
            answered = len(self.answers)
            for count, event in self.milestones:
                if answered >= count:
                    event.set()
            if value != i * 2:
                self.wrong.append((i, value))

    async def run(self, callers: int) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(self.caller)

    def check(self) -> None:
        assert self.wrong == []
        assert sorted(self.answers) == list(range(self.total))
        assert set(self.answers.values()) == {1}


def used_memory(client: sync_redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


@pytest.mark.timeout(240)
async def test_every_call_answered_once_while_workers_are_killed(tmp_path: Path, namespace: str) -> None:
    total = 10_000
    log = tmp_path / "runs.log"
    with LocalRedis() as server:
        admin = sync_redis.Redis.from_url(server.url)
        keys = Keys(namespace)
        empty = used_memory(admin)
        workers = Workers(server.url, namespace)
        args = (*FAST_FAILOVER, "--concurrency", "8", "--dep", f"log={json.dumps(str(log))}")
        try:
            for _ in range(3):
                workers.start(CHAOS, *args, quiet=True)
            workers.wait_registered("chaos", 3)
            # Fixed costs (scripts, the stream and its group, connections) come with the first calls.
            async with Client(server.url, namespace=namespace) as client:
                for i in range(300):
                    await client.call("chaos", "work", (-1 - i,))  # negative: not counted below
            warm = used_memory(admin)
            kills = 0
            async with Client(server.url, namespace=namespace) as client:
                load = Load(client, total)

                async def killer() -> None:
                    nonlocal kills
                    rng = random.Random(7)
                    while load.next < total:
                        await anyio.sleep(0.7)
                        live = [p for p in workers.procs if p.poll() is None]
                        if len(live) > 1:
                            workers.kill(rng.choice(live))
                            kills += 1
                            workers.start(CHAOS, *args, quiet=True)

                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(killer)
                    await load.run(48)
                elapsed = time.monotonic() - started
            runs = Counter(n for line in log.read_text().splitlines() if (n := int(line.split()[0])) >= 0)
            print(
                f"\nchaos: {total} calls in {elapsed:.1f} s, {kills} workers killed, "
                f"{sum(runs.values()) - total} calls run again after a kill, "
                f"longest call (the worst failover) {load.slowest:.2f} s"
            )
            load.check()
            assert kills >= 3
            assert set(runs) == set(range(total))  # every call ran, some more than once
            assert load.slowest < 10  # failover in seconds, never the hour of a visibility timeout
        finally:
            for proc in workers.procs:
                if proc.poll() is None:
                    proc.terminate()
            workers.close()
        # Memory: acknowledged entries deleted, reply lists drained, dead records expired.
        assert admin.xlen(keys.calls("chaos")) == 0
        assert admin.xpending(keys.calls("chaos"), GROUP)["pending"] == 0
        assert admin.keys(f"{namespace}:reply:*") == []
        end = used_memory(admin)
        print(
            f"chaos: Redis used_memory {empty / 1024:.0f} KiB empty, {warm / 1024:.0f} KiB after a warm-up, "
            f"{end / 1024:.0f} KiB after {total} calls and {kills} kills"
        )
        assert end - warm < 256 * 1024
        admin.close()


@pytest.mark.timeout(180)
async def test_every_call_answered_once_across_redis_restarts(aof_redis: LocalRedis, namespace: str) -> None:
    total = 2_000
    workers = Workers(aof_redis.url, namespace)
    try:
        for _ in range(2):
            workers.start(CHAOS, "--heartbeat-ttl", "3", "--concurrency", "16", quiet=True)
        workers.wait_registered("chaos", 2)
        restarts = 0
        async with Client(aof_redis.url, namespace=namespace) as client:
            load = Load(client, total, retry_unavailable=True)

            async def restarter() -> None:
                nonlocal restarts
                for milestone in (load.reached(0.25), load.reached(0.6)):  # twice, under load
                    await milestone.wait()
                    aof_redis.stop(kill=True)
                    await anyio.sleep(0.5)
                    aof_redis.start()
                    restarts += 1

            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(restarter)
                await load.run(32)
            elapsed = time.monotonic() - started
        print(
            f"\nredis restarts: {total} calls in {elapsed:.1f} s across {restarts} restarts "
            f"(SIGKILL, AOF fsync always), {load.refused} sends refused while Redis was down, "
            f"longest call {load.slowest:.2f} s"
        )
        load.check()
        assert restarts == 2
    finally:
        workers.close()
