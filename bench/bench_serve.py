"""serve() start-up: from ``async with serve(...)`` to the first answer, with a Redis already running.

Run: `python -m bench.bench_serve [--runs 30]`. Uses $TITAN_TEST_REDIS_URL, else a private
redis-server started before the first measure (not counted). Each run serves the calculator in a
fresh namespace, awaits one call and leaves the block (the drain is not counted).
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio

from processes.calculator import Calculator
from titan_broker.testing import local_redis_url, serve


async def once(url: str) -> float:
    started = time.perf_counter()
    async with serve(Calculator, url=url) as calc:
        assert await calc.add(1, 2) == 3
        elapsed = time.perf_counter() - started
    return elapsed


async def run(runs: int) -> None:
    url = local_redis_url()
    first = await once(url)  # with the worker runtime's import and the first connections' set-up
    print(f"first serve() in this process: {first * 1000:.1f} ms")
    times = [await once(url) for _ in range(runs)]
    ms = sorted(t * 1000 for t in times)
    print(f"serve() start-up to first answer, {runs} runs: median {statistics.median(ms):.1f} ms, "
          f"p90 {ms[int(len(ms) * 0.9) - 1]:.1f} ms, max {ms[-1]:.1f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    anyio.run(run, args.runs)


if __name__ == "__main__":
    main()
