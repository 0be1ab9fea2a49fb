"""Core call path against the hand-written floor, in one run on one private Redis.

(A) one caller, sequential `add` calls after a warm-up: p50/p99 latency.
(B) 64 calls in flight, 2 worker processes: calls/s.
The same two for a minimal XADD -> XREADGROUP -> LPUSH -> BLPOP loop, then the ratios.
Both systems run side by side and are measured in alternating rounds, so that
drift in a shared, noisy machine hits both alike.
Run: `make bench` or `python -m bench.bench_core [--calls-a 2000] [--calls-b 10000] [--rounds 4]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import msgpack
import psutil
import redis.asyncio as aioredis

from processes.calculator import Calculator
from titan_broker import ProcessManager
from titan_broker.testing._local_redis import LocalRedis

WARMUP = 200
IN_FLIGHT = 64
Call = Callable[[int], Awaitable[object]]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time used so far by these processes."""
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(call: Call, n: int) -> list[float]:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - t)
    return samples


async def throughput(callers: list[Call], n: int) -> float:
    per_task = n // len(callers)

    async def run(c: Call) -> None:
        for i in range(per_task):
            await c(i)

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for c in callers:
            tg.start_soon(run, c)
    return per_task * len(callers) / (time.perf_counter() - t)


Harness = tuple[Call, list[Call], Callable[[], Awaitable[None]], list[int]]


@asynccontextmanager
async def titan(url: str, name: str | None = None) -> AsyncIterator[Harness]:
    """The calculator service (served as ``name`` when given: bench_cluster picks its hash slot)."""
    async with ProcessManager(url, namespace=f"bench-{uuid.uuid4().hex[:6]}") as pm:
        calc = await pm.spawn("processes/calculator.py", Calculator, name=name)

        async def second_worker() -> None:
            await pm.spawn("processes/calculator.py", Calculator, name=name)

        def one(i: int) -> Awaitable[object]:
            return calc.add(i, 1)

        yield one, [one] * IN_FLIGHT, second_worker, [w.pid for w in pm.workers]


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[Harness]:
    stream = f"raw-{uuid.uuid4().hex[:6]}"
    procs: list[subprocess.Popen[bytes]] = []

    async def start_worker() -> None:
        cmd = [sys.executable, "-m", "bench.raw_worker", url, stream, f"c{len(procs)}"]
        procs.append(subprocess.Popen(cmd))  # noqa: ASYNC220 - starting it does not block

    redis = aioredis.Redis.from_url(url, max_connections=2 * IN_FLIGHT + 8)

    def make() -> Call:
        reply = f"raw-reply-{uuid.uuid4().hex}"

        async def call(i: int) -> object:
            await redis.xadd(stream, {"a": msgpack.packb([i, 1]), "r": reply})
            _, raw = await redis.blpop([reply], timeout=10)  # type: ignore[misc]
            return msgpack.unpackb(raw)

        return call

    try:
        await start_worker()
        yield make(), [make() for _ in range(IN_FLIGHT)], start_worker, [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        await redis.aclose()


async def run(url: str, redis_pid: int, calls_a: int, calls_b: int, rounds: int) -> None:
    me = os.getpid()
    async with titan(url) as (t_one, t_many, t_grow, t_pids), raw(url) as (r_one, r_many, r_grow, r_pids):
        lat: dict[str, list[float]] = {"titan": [], "raw": []}
        rate: dict[str, list[float]] = {"titan": [], "raw": []}
        cpu: dict[str, list[float]] = {"titan": [0.0, 0.0, 0.0], "raw": [0.0, 0.0, 0.0]}
        for one in (t_one, r_one):
            await sequential(one, WARMUP)
        for _ in range(rounds):
            for name, one, worker_pids in (("titan", t_one, t_pids), ("raw", r_one, r_pids)):
                groups = [[me], worker_pids, [redis_pid]]
                before = [cpu_seconds(g) for g in groups]
                lat[name] += await sequential(one, calls_a // rounds)
                for k, g in enumerate(groups):
                    cpu[name][k] += cpu_seconds(g) - before[k]
        await t_grow()
        await r_grow()
        for many in (t_many, r_many):
            await throughput(many, IN_FLIGHT * 10)
        for _ in range(rounds):
            for name, many in (("titan", t_many), ("raw", r_many)):
                rate[name].append(await throughput(many, calls_b // rounds))
    ms = 1000
    print(f"{'':26}{'titan':>10}{'hand-written':>14}{'ratio':>8}")
    for label, q in (("A p50 latency (ms)", 0.5), ("A p99 latency (ms)", 0.99)):
        t, r = percentile(lat["titan"], q) * ms, percentile(lat["raw"], q) * ms
        print(f"{label:26}{t:10.3f}{r:14.3f}{t / r:8.2f}")
    n = calls_a // rounds * rounds
    for k, part in enumerate(("caller", "worker", "redis")):
        t, r = cpu["titan"][k] / n * 1e6, cpu["raw"][k] / n * 1e6
        print(f"{'A CPU us/call, ' + part:26}{t:10.0f}{r:14.0f}{t / r:8.2f}")
    t_rate, r_rate = sum(rate["titan"]) / rounds, sum(rate["raw"]) / rounds
    print(f"{'B throughput (calls/s)':26}{t_rate:10,.0f}{r_rate:14,.0f}{t_rate / r_rate:8.2f}")
    print(f"B per round: titan {[round(x) for x in rate['titan']]}, raw {[round(x) for x in rate['raw']]}")
    print("targets: A p50 ratio <= 1.30, B ratio >= 0.75")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls-a", type=int, default=2000)
    parser.add_argument("--calls-b", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with LocalRedis() as server:
        assert server.process is not None
        anyio.run(run, server.url, server.process.pid, args.calls_a, args.calls_b, args.rounds)


if __name__ == "__main__":
    main()
