"""Streaming items/s, an idle calculator worker's RSS, and pm.spawn() to the first answered call.

Run: `python -m bench.bench_lean [--rounds 3] [--against PATH]`. With the spawn's wall-clock time, the
CPU time the new worker used until it answered (user and system, from /proc), which a loaded machine
disturbs much less.

Each round measures this checkout in a fresh process; with `--against`, another checkout
(its own `.venv`, say the main branch) is measured in the same round, alternating, on the same
Redis, and the ratios are printed. Each checkout's bytecode is written first, as an installed
package has it (`bench/bytecode.py`; `--no-compile` leaves the checkouts as they are).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ITEMS = 20_000
SPAWNS = 5


def rss_mib(pid: int) -> float:
    """The resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_ms(pid: int) -> float:
    """The CPU time a process has used so far, user and system (Linux; in clock ticks, 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def children() -> set[int]:
    """The pids of this process's children (Linux)."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


async def measure(url: str) -> dict[str, float]:
    """The three figures of the checkout this process imports ``titan_broker`` from."""
    from titan_broker import ProcessManager

    async with ProcessManager(url, namespace=f"bench-{uuid.uuid4().hex[:6]}") as pm:
        spawns, cpus = [], []
        for _ in range(SPAWNS):
            before = children()
            started = time.perf_counter()
            calc: Any = await pm.spawn("processes/calculator.py")
            await calc.add(1, 1)
            spawns.append(time.perf_counter() - started)
            (pid, *_) = children() - before
            cpus.append(cpu_ms(pid))  # steadier than the wall clock on a loaded machine
        await asyncio.sleep(2.0)  # idle: what a worker holds between calls
        rss = rss_mib(pid)
        streamer: Any = await pm.spawn("tests/services/streamer.py")
        async for _ in streamer.numbers(100):
            pass
        started = time.perf_counter()
        count = 0
        async for _ in streamer.numbers(ITEMS):
            count += 1
        rate = count / (time.perf_counter() - started)
        await pm.shutdown()
    spawn_ms, spawn_cpu_ms = statistics.median(spawns) * 1000, statistics.median(cpus)
    return {"spawn_ms": spawn_ms, "spawn_cpu_ms": spawn_cpu_ms, "rss_mib": rss, "items_s": rate}


def once(checkout: Path, url: str) -> dict[str, float]:
    """Measure ``checkout`` in a process of its own virtualenv."""
    python = checkout / ".venv" / "bin" / "python"
    code = (
        "import asyncio, json, runpy, sys; "
        f"m = runpy.run_path({str(Path(__file__).resolve())!r}); "
        f"print(json.dumps(asyncio.run(m['measure']({url!r}))))"
    )
    out = subprocess.run(
        [str(python), "-c", code], cwd=checkout, check=True, capture_output=True, text=True, timeout=300
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", type=Path, help="another checkout to measure in the same rounds")
    parser.add_argument("--no-compile", action="store_true", help="leave the checkouts' bytecode as it is")
    args = parser.parse_args()
    from titan_broker.testing._local_redis import LocalRedis

    from .bytecode import compile_checkout

    here = Path(__file__).resolve().parent.parent
    checkouts = {"this": here} | ({"against": args.against.resolve()} if args.against else {})
    results: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    if not args.no_compile:
        for path in checkouts.values():
            compile_checkout(path, path / ".venv" / "bin" / "python")
    with LocalRedis() as server:
        for r in range(args.rounds):
            order = list(checkouts.items())
            for name, path in order if r % 2 == 0 else reversed(order):
                results[name].append(once(path, server.url))
                print(f"round {r + 1} {name}: {json.dumps(results[name][-1])}", file=sys.stderr)
    figures = (("items_s", "streaming items/s", ">= 20000"), ("rss_mib", "idle worker RSS MiB", "<= 35"),
               ("spawn_ms", "spawn to first answer ms", "<= 200"),
               ("spawn_cpu_ms", "worker CPU to 1st answer ms", "-"))  # fmt: skip
    for key, label, target in figures:
        line = f"{label:28}"
        medians = {}
        for name in checkouts:
            values = [r[key] for r in results[name]]
            medians[name] = statistics.median(values)
            line += f"  {name} {medians[name]:9.1f} ({min(values):.1f}-{max(values):.1f})"
        if "against" in medians:
            line += f"  this/against {medians['this'] / medians['against']:.2f}"
        print(f"{line}  (target {target}; median and range of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
