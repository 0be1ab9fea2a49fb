"""Core call path against a batched hand-written Redis-streams loop (bench/loop.py), on one private Redis.

(A) one caller, sequential `add` calls after a warm-up: p50/p99 latency.
(B) 64 calls in flight, 10,000 calls a round: calls/s, at each worker count asked for; with Redis's
    commands and command time per call (INFO commandstats, reset before each run) and the CPU per
    call of the caller, the worker processes and redis-server (psutil).
Both sides run side by side and are measured in alternating rounds, so that drift on a shared,
noisy machine hits both alike; each round gives one titan ÷ loop ratio.
titan-broker only: streaming (an async generator of 2,000 small ints), idle RSS of a `titan-worker`
serving the calculator example, and `pm.spawn()` to the first answered call; the loop's own worker
RSS and start-to-first-answer are printed beside them as the floor's. The bytecode of what the
workers import is written first, as an installed package has it (`bench/bytecode.py`).
Run: `make bench` or `python -m bench.bench_core [--rounds 3] [--workers 2,4,8] [--quick] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
import redis.asyncio as aioredis

from bench.bytecode import compile_checkout
from bench.loop import loop_client, ready_key
from bench.services.numbers import Numbers
from processes.calculator import Calculator
from titan_broker import ProcessManager
from titan_broker.testing import LocalRedis

WARMUP = 200
IN_FLIGHT = 64
STREAM_ITEMS = 2000
NUMBERS = "bench/services/numbers.py"
SCRIPT_COMMANDS = {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"}
OWN_COMMANDS = {"info", "config|resetstat"}  # the benchmark's own, not the call path's
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


@dataclass
class Side:
    """One system under test: how to call it, grow it, and which worker processes it runs."""

    name: str
    add: Callable[[int, int], Awaitable[object]]
    grow: Callable[[], Awaitable[None]]
    pids: list[int]
    sent: int = 0
    answered: int = 0

    async def call(self, i: int) -> object:
        self.sent += 1
        result = await self.add(i, 1)
        if result == i + 1:
            self.answered += 1
        return result


Harness = tuple[Call, list[Call], Callable[[], Awaitable[None]], list[int]]


@asynccontextmanager
async def titan_side(url: str, name: str | None = None) -> AsyncIterator[tuple[Side, Any]]:
    """The numbers service on one worker (served as ``name`` when given); the side and its proxy."""
    async with ProcessManager(url, namespace=f"bench-{uuid.uuid4().hex[:6]}") as pm:
        proxy = await pm.spawn(NUMBERS, Numbers, name=name)
        pids = [w.pid for w in pm.workers]

        async def grow() -> None:
            await pm.spawn(NUMBERS, Numbers, name=name)
            pids[:] = [w.pid for w in pm.workers]

        yield Side("titan", proxy.add, grow, pids), proxy


@asynccontextmanager
async def titan(url: str, name: str | None = None) -> AsyncIterator[Harness]:
    """bench_core's titan harness as the other benchmarks use it: (one, many, add a worker, pids)."""
    async with titan_side(url, name) as (side, _):
        yield side.call, [side.call] * IN_FLIGHT, side.grow, side.pids


async def wait_ready(redis: aioredis.Redis, stream: str, timeout: float = 30) -> None:
    """Until a loop worker started on this stream says it is about to read."""
    if not await redis.blpop([ready_key(stream)], timeout=timeout):
        raise TimeoutError(f"no loop worker on {stream} ready within {timeout} s")


@asynccontextmanager
async def loop_side(url: str) -> AsyncIterator[Side]:
    stream = f"loop-{uuid.uuid4().hex[:6]}"
    procs: list[subprocess.Popen[bytes]] = []
    admin = aioredis.Redis.from_url(url)
    try:
        async with loop_client(url, stream) as client:

            async def grow() -> None:
                cmd = [sys.executable, "-m", "bench.loop", url, stream, f"c{len(procs)}"]
                procs.append(subprocess.Popen(cmd))  # noqa: ASYNC220 - starting it does not block
                pids.append(procs[-1].pid)
                await wait_ready(admin, stream)

            pids: list[int] = []
            await grow()
            yield Side("loop", client.add, grow, pids)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        await admin.delete(stream, ready_key(stream))
        await admin.aclose()


async def command_stats(admin: aioredis.Redis) -> tuple[int, int]:
    """(commands, µs executing them) since the last CONFIG RESETSTAT: every command a client sent
    and every command a script ran; the time of the commands alone, without the scripts' own rows
    (whose time already holds the commands they run, which have rows of their own)."""
    calls = usec = 0
    for key, row in (await admin.info("commandstats")).items():
        command = key.removeprefix("cmdstat_")
        if command in OWN_COMMANDS:
            continue
        calls += int(row["calls"])
        if command not in SCRIPT_COMMANDS:
            usec += int(row["usec"])
    return calls, usec


@dataclass
class Results:
    rounds: int
    workers: list[int]
    a_p50_us: dict[str, list[float]] = field(default_factory=lambda: {"titan": [], "loop": []})
    a_p99_us: dict[str, list[float]] = field(default_factory=lambda: {"titan": [], "loop": []})
    # per worker count, per side, per round
    b: dict[int, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    stream_items_per_s: list[float] = field(default_factory=list)
    idle_rss_mib: dict[str, float] = field(default_factory=dict)
    spawn_ms: dict[str, list[float]] = field(default_factory=lambda: {"titan": [], "loop": []})
    calls: dict[str, int] = field(default_factory=dict)
    answered: dict[str, int] = field(default_factory=dict)


async def measure_b(side: Side, admin: aioredis.Redis, redis_pid: int, calls: int) -> dict[str, float]:
    me = os.getpid()
    await admin.config_resetstat()
    groups = [[me], list(side.pids), [redis_pid]]
    before = [cpu_seconds(g) for g in groups]
    rate = await throughput([side.call] * IN_FLIGHT, calls)
    cpu = [cpu_seconds(g) - b for g, b in zip(groups, before, strict=True)]
    commands, usec = await command_stats(admin)
    n = calls // IN_FLIGHT * IN_FLIGHT
    return {
        "calls_per_s": rate,
        "redis_commands_per_call": commands / n,
        "redis_command_us_per_call": usec / n,
        "cpu_us_per_call_caller": cpu[0] / n * 1e6,
        "cpu_us_per_call_workers": cpu[1] / n * 1e6,
        "cpu_us_per_call_redis": cpu[2] / n * 1e6,
    }


async def streaming(proxy: Any, n: int) -> float:
    t = time.perf_counter()
    received = 0
    async for item in proxy.count(n):
        assert item == received
        received += 1
    assert received == n
    return n / (time.perf_counter() - t)


async def idle_and_spawn(url: str, results: Results, spawns: int) -> None:
    """Idle RSS of a calculator worker, and start to first answer, titan-broker and the loop."""
    async with ProcessManager(url, namespace=f"bench-{uuid.uuid4().hex[:6]}") as pm:
        await pm.spawn("processes/calculator.py", Calculator)
        results.idle_rss_mib["titan"] = psutil.Process(pm.workers[0].pid).memory_info().rss / 2**20
        await pm.stop_worker(pm.workers[0])
        for _ in range(spawns):
            t = time.perf_counter()
            proxy = await pm.spawn(NUMBERS, Numbers)
            assert await proxy.add(1, 1) == 2
            results.spawn_ms["titan"].append((time.perf_counter() - t) * 1000)
            await pm.stop_worker(pm.workers[-1])
    for k in range(spawns):
        stream = f"loop-spawn-{uuid.uuid4().hex[:6]}"
        async with loop_client(url, stream) as client:
            t = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "bench.loop", url, stream, "c0"])  # noqa: ASYNC220
            try:
                with anyio.fail_after(30):
                    assert await client.add(1, 1) == 2
                results.spawn_ms["loop"].append((time.perf_counter() - t) * 1000)
                if k == 0:
                    results.idle_rss_mib["loop"] = psutil.Process(proc.pid).memory_info().rss / 2**20
            finally:
                proc.kill()
                proc.wait()


async def run(url: str, redis_pid: int, args: argparse.Namespace) -> Results:
    results = Results(rounds=args.rounds, workers=args.workers)
    admin = aioredis.Redis.from_url(url)
    try:
        async with AsyncExitStack() as stack:
            titan_, proxy = await stack.enter_async_context(titan_side(url))
            loop = await stack.enter_async_context(loop_side(url))
            sides = (titan_, loop)
            for side in sides:
                await sequential(side.call, WARMUP)
            for _ in range(args.rounds):
                for side in sides:
                    samples = await sequential(side.call, args.calls_a)
                    results.a_p50_us[side.name].append(percentile(samples, 0.5) * 1e6)
                    results.a_p99_us[side.name].append(percentile(samples, 0.99) * 1e6)
                results.stream_items_per_s.append(await streaming(proxy, STREAM_ITEMS))
            for count in args.workers:
                for side in sides:
                    while len(side.pids) < count:
                        await side.grow()
                    await throughput([side.call] * IN_FLIGHT, IN_FLIGHT * 10)  # warm-up
                per_count: dict[str, list[dict[str, float]]] = {"titan": [], "loop": []}
                for _ in range(args.rounds):
                    for side in sides:
                        per_count[side.name].append(await measure_b(side, admin, redis_pid, args.calls_b))
                results.b[count] = per_count
            for side in sides:
                results.calls[side.name] = side.sent
                results.answered[side.name] = side.answered
        await idle_and_spawn(url, results, args.spawns)
    finally:
        await admin.aclose()
    return results


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def ratios(t: list[float], loop: list[float]) -> str:
    return spread([a / b for a, b in zip(t, loop, strict=True)], ".2f")


def column(b: dict[str, list[dict[str, float]]], side: str, key: str) -> list[float]:
    """One figure of one side's B rounds."""
    return [round_[key] for round_ in b[side]]


def print_table(r: Results) -> None:
    rows: list[tuple[str, str, str, str]] = []

    def paired(label: str, t: list[float], loop: list[float], fmt: str) -> None:
        rows.append((label, spread(t, fmt), spread(loop, fmt), ratios(t, loop)))

    paired("A p50 latency (µs)", r.a_p50_us["titan"], r.a_p50_us["loop"], ",.0f")
    paired("A p99 latency (µs)", r.a_p99_us["titan"], r.a_p99_us["loop"], ",.0f")
    first = r.workers[0]
    for count in r.workers:
        b = r.b[count]
        paired(
            f"B calls/s, {count} workers",
            column(b, "titan", "calls_per_s"),
            column(b, "loop", "calls_per_s"),
            ",.0f",
        )
    for key, label in (
        ("redis_commands_per_call", "B Redis commands/call"),
        ("redis_command_us_per_call", "B Redis command µs/call"),
        ("cpu_us_per_call_redis", "B CPU µs/call, redis"),
        ("cpu_us_per_call_caller", "B CPU µs/call, caller"),
        ("cpu_us_per_call_workers", "B CPU µs/call, workers"),
    ):
        b = r.b[first]
        paired(f"{label} ({first}w)", column(b, "titan", key), column(b, "loop", key), ".1f")
    rows.append(("streaming items/s", spread(r.stream_items_per_s, ",.0f"), "not measured", ""))
    rows.append(
        (
            "idle worker RSS (MiB)",
            f"{r.idle_rss_mib['titan']:.1f}",
            f"{r.idle_rss_mib['loop']:.1f}",
            f"{r.idle_rss_mib['titan'] / r.idle_rss_mib['loop']:.2f}",
        )
    )
    t_spawn, l_spawn = r.spawn_ms["titan"], r.spawn_ms["loop"]
    rows.append(
        (
            "spawn to 1st answer (ms)",
            spread(t_spawn, ",.0f"),
            spread(l_spawn, ",.0f"),
            f"{statistics.median(t_spawn) / statistics.median(l_spawn):.2f}",
        )
    )
    widths = [max(len(row[k]) for row in rows) for k in range(4)]
    header = ("", "titan-broker", "batched loop", "titan/loop")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    for row in (header, *rows):
        print(
            f"{row[0]:<{widths[0]}}  "
            + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], widths[1:], strict=True))
        )
    print(
        f"median (min-max) of {r.rounds} alternating rounds; ratio: median (min-max) of the per-round ratios."
        " "
        f"A: 1 caller, sequential; B: {IN_FLIGHT} in flight. Redis command µs: INFO commandstats, "
        "scripts' own rows left out (their time holds the commands they run); commands: every command, "
        "EVALSHA and those scripts run. Streaming: titan-broker only, an async generator of "
        f"{STREAM_ITEMS} ints. Idle RSS: titan-worker serving the calculator after it is ready; loop: "
        "its worker after its first answer. Spawn: median of "
        f"{len(t_spawn)}. Calls answered: titan {r.answered['titan']}/{r.calls['titan']}, "
        f"loop {r.answered['loop']}/{r.calls['loop']}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls-a", type=int, default=1000, help="sequential calls per round and side")
    parser.add_argument("--calls-b", type=int, default=10_000, help="calls per B round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="2", help="worker counts for B, comma-separated (2,4,8)")
    parser.add_argument("--spawns", type=int, default=5, help="spawns to first answer, per side")
    parser.add_argument("--quick", action="store_true", help="small counts, one round: a smoke test")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    args.workers = sorted({int(w) for w in args.workers.split(",")})
    if args.quick:
        args.calls_a, args.calls_b, args.rounds, args.spawns = 100, IN_FLIGHT * 20, 1, 1
    compile_checkout(Path(__file__).resolve().parent.parent)
    with LocalRedis() as server:
        assert server.process is not None
        results = anyio.run(run, server.url, server.process.pid, args)
    if args.json:
        data = vars(results) | {"b": {str(k): v for k, v in results.b.items()}}
        print(json.dumps(data, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
