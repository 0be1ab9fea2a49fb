"""The B workload (64 calls in flight, 2 worker processes, ``add``) from a Node caller next to the
Python caller, in one run on one private Redis: calls/s for each, and each caller's CPU per call.

The two callers take turns, round by round, against the same two workers, so that drift in a
shared, noisy machine hits both alike. The Node caller is bench/bench_node.mjs on the Node client
(clients/node, built by ``npm ci`` there); its CPU is measured inside it (process.cpuUsage, after
its warm-up), the Python caller's with psutil around its rounds.
Run: ``make bench-node`` or ``python -m bench.bench_node [--calls 10000] [--rounds 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import anyio

from bench.bench_core import IN_FLIGHT, Call, cpu_seconds, throughput
from processes.calculator import Calculator
from titan_broker import ProcessManager
from titan_broker.testing._local_redis import LocalRedis

ROOT = Path(__file__).resolve().parent.parent
NODE_CALLER = ROOT / "bench" / "bench_node.mjs"
NODE_TIMEOUT = 300.0
"""Seconds one round of the Node caller may take, start-up included."""


def node_round(url: str, namespace: str, calls: int) -> dict[str, float]:
    node = shutil.which("node")
    if node is None:
        sys.exit("bench_node: 'node' is not on PATH (Node 20 or newer)")
    if not (ROOT / "clients" / "node" / "dist" / "index.js").exists():
        sys.exit(
            "bench_node: the Node client is not built: run 'npm ci' in clients/node (make bench-node does)"
        )
    done = subprocess.run(
        [node, str(NODE_CALLER), url, namespace, str(calls)],
        capture_output=True, text=True, timeout=NODE_TIMEOUT, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"bench_node: the Node caller failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def run(url: str, calls: int, rounds: int) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    me = os.getpid()
    async with ProcessManager(url, namespace=namespace) as pm:
        calc = await pm.spawn("processes/calculator.py", Calculator)
        await pm.spawn("processes/calculator.py", Calculator)

        async def one(i: int) -> object:
            return await calc.add(i, 1)

        many: list[Call] = [one] * IN_FLIGHT
        await throughput(many, IN_FLIGHT * 10)  # warm-up
        rates: dict[str, list[float]] = {"python": [], "node": []}
        cpus: dict[str, list[float]] = {"python": [], "node": []}
        per_round = calls // rounds // IN_FLIGHT * IN_FLIGHT
        for _ in range(rounds):
            before = cpu_seconds([me])
            rates["python"].append(await throughput(many, per_round))
            cpus["python"].append((cpu_seconds([me]) - before) / per_round * 1e6)
            node = await anyio.to_thread.run_sync(node_round, url, namespace, per_round)
            rates["node"].append(node["rate"])
            cpus["node"].append(node["cpu_us_per_call"])
    print(
        f"B workload: {IN_FLIGHT} calls in flight, 2 workers, add; {rounds} rounds of {per_round} calls each"
    )
    print(f"{'':30}{'Python':>10}{'Node':>10}{'Node/Python':>13}")
    p_rate, n_rate = sum(rates["python"]) / rounds, sum(rates["node"]) / rounds
    print(f"{'B throughput (calls/s)':30}{p_rate:10,.0f}{n_rate:10,.0f}{n_rate / p_rate:13.2f}")
    p_cpu, n_cpu = sum(cpus["python"]) / rounds, sum(cpus["node"]) / rounds
    print(f"{'caller CPU per call (us)':30}{p_cpu:10.0f}{n_cpu:10.0f}{n_cpu / p_cpu:13.2f}")
    print(
        f"per round: python {[round(x) for x in rates['python']]}, node {[round(x) for x in rates['node']]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with LocalRedis() as server:
        anyio.run(run, server.url, args.calls, args.rounds)


if __name__ == "__main__":
    main()
