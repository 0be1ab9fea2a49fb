"""Core call path against the hand-written floor, in one run on one private Redis.

(A) one caller, sequential `add` calls after a warm-up: p50/p99 latency.
(B) 64 calls in flight, 2 worker processes: calls/s.
The same two for a minimal XADD -> XREADGROUP -> LPUSH -> BLPOP loop, then the ratios.
Run: `make bench` or `python -m bench.bench_core [--calls-a 2000] [--calls-b 10000]`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio
import msgpack
import redis.asyncio as aioredis

from processes.calculator import Calculator
from titan_broker import ProcessManager
from titan_broker.local_redis import LocalRedis

WARMUP = 200
IN_FLIGHT = 64


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(call: Callable[[int], Awaitable[object]], n: int) -> list[float]:
    for i in range(WARMUP):
        await call(i)
    samples = []
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - t)
    return samples


async def throughput(
    make_caller: Callable[[], Awaitable[Callable[[int], Awaitable[object]]]], n: int
) -> float:
    callers = [await make_caller() for _ in range(IN_FLIGHT)]
    for c in callers:
        await c(0)
    per_task = n // IN_FLIGHT

    async def run(c: Callable[[int], Awaitable[object]]) -> None:
        for i in range(per_task):
            await c(i)

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for c in callers:
            tg.start_soon(run, c)
    return per_task * IN_FLIGHT / (time.perf_counter() - t)


async def bench_titan(url: str, calls_a: int, calls_b: int) -> tuple[list[float], float]:
    async with ProcessManager(url, namespace=f"bench-{uuid.uuid4().hex[:6]}") as pm:
        calc = await pm.spawn("processes/calculator.py", Calculator)
        lat = await sequential(lambda i: calc.add(i, 1), calls_a)
        await pm.spawn("processes/calculator.py", Calculator)

        async def make() -> Callable[[int], Awaitable[object]]:
            return lambda i: calc.add(i, 1)

        rate = await throughput(make, calls_b)
    return lat, rate


async def bench_raw(url: str, calls_a: int, calls_b: int) -> tuple[list[float], float]:
    stream = f"raw-{uuid.uuid4().hex[:6]}"
    procs: list[subprocess.Popen[bytes]] = []

    def start_worker() -> None:
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.raw_worker", url, stream,
                                       f"c{len(procs)}"]))  # fmt: skip

    redis = aioredis.Redis.from_url(url, max_connections=IN_FLIGHT + 8)

    async def make() -> Callable[[int], Awaitable[object]]:
        reply = f"raw-reply-{uuid.uuid4().hex}"

        async def call(i: int) -> object:
            await redis.xadd(stream, {"a": msgpack.packb([i, 1]), "r": reply})
            _, raw = await redis.blpop([reply], timeout=10)  # type: ignore[misc]
            return msgpack.unpackb(raw)

        return call

    try:
        start_worker()
        one = await make()
        lat = await sequential(one, calls_a)
        start_worker()
        rate = await throughput(make, calls_b)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        await redis.aclose()
    return lat, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls-a", type=int, default=2000)
    parser.add_argument("--calls-b", type=int, default=10_000)
    args = parser.parse_args()
    with LocalRedis() as server:
        raw_lat, raw_rate = anyio.run(bench_raw, server.url, args.calls_a, args.calls_b)
        lat, rate = anyio.run(bench_titan, server.url, args.calls_a, args.calls_b)
    ms = 1000
    print(f"{'':24}{'titan':>12}{'hand-written':>14}{'ratio':>8}")
    for label, q in (("A p50 latency (ms)", 0.5), ("A p99 latency (ms)", 0.99)):
        t, r = percentile(lat, q) * ms, percentile(raw_lat, q) * ms
        print(f"{label:24}{t:12.3f}{r:14.3f}{t / r:8.2f}")
    print(f"{'A mean latency (ms)':24}{statistics.mean(lat) * ms:12.3f}{statistics.mean(raw_lat) * ms:14.3f}")
    print(f"{'B throughput (calls/s)':24}{rate:12,.0f}{raw_rate:14,.0f}{rate / raw_rate:8.2f}")
    print("targets: A p50 ratio <= 1.30, B ratio >= 0.75")


if __name__ == "__main__":
    main()
