"""Pools on this machine: CPU-bound throughput with 2 workers against 1, and spawn-to-first-answer.

Run: `python -m bench.bench_pool [--calls 200] [--work 400000]`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import anyio

from processes.calculator import Calculator
from titan_broker import Pool, ProcessManager
from titan_broker.testing._local_redis import LocalRedis

CPU = "bench/services/cpu.py"


async def throughput(pm: ProcessManager, size: int, calls: int, work: int) -> float:
    pool: Pool[Any] = await pm.pool(CPU, size=size, concurrency=4)
    try:
        await pool.proxy.crunch(1000)
        done = 0

        async def caller() -> None:
            nonlocal done
            while done < calls:
                done += 1
                await pool.proxy.with_options(timeout=120).crunch(work)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(caller)
        return calls / (time.perf_counter() - started)
    finally:
        await pool.close()


async def first_answer(pm: ProcessManager) -> float:
    started = time.perf_counter()
    calc = await pm.spawn("processes/calculator.py", Calculator)
    await calc.add(1, 1)
    return time.perf_counter() - started


def interpreter_startup() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


async def run(url: str, calls: int, work: int) -> None:
    async with ProcessManager(url, namespace=f"bench-{uuid.uuid4().hex[:6]}") as pm:
        one = await throughput(pm, 1, calls, work)
        two = await throughput(pm, 2, calls, work)
        one_again = await throughput(pm, 1, calls, work)
        print(
            f"CPU-bound crunch({work}): pool of 1 {one:.1f} and {one_again:.1f} calls/s, pool of 2 {two:.1f}"
        )
        print(f"  ratio 2 : 1 = {two / ((one + one_again) / 2):.2f} (target >= 1.8)")
        spawns = [await first_answer(pm) for _ in range(5)]
        await pm.shutdown()
    bare = statistics.median(interpreter_startup() for _ in range(5))
    first = statistics.median(spawns)
    print(f"spawn to first answer: median {first * 1000:.0f} ms of 5 (min {min(spawns) * 1000:.0f} ms);")
    beyond = (first - bare) * 1000
    print(f"  bare interpreter start-up {bare * 1000:.0f} ms; beyond it {beyond:.0f} ms (target <= 500)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--work", type=int, default=400_000)
    args = parser.parse_args()
    with LocalRedis() as server:
        anyio.run(run, server.url, args.calls, args.work)


if __name__ == "__main__":
    main()
