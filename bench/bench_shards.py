"""One busy service on a Redis Cluster: its Redis work on one primary (1 shard), or spread over all.

bench_core's B workload (64 calls in flight from one process, ``add``; ``--in-flight`` for more) to
ONE service on a local cluster of P primaries (no replicas), served by W worker processes, with the
service on 1 shard and on P shards whose hash tags land on P different primaries. The rounds
alternate between the two. Per round and per primary: the commands' time from ``INFO commandstats``
(reset before the round; the scripts' own rows left out, their time holds the commands they run) and
the redis-server process's CPU time. Printed: calls/s, Redis µs per call (all primaries), the
busiest primary's share of the Redis CPU, and what one service could reach with 3 to 24 primaries of
one core each at the measured cost per call.

On a 2-core machine the callers and workers, not Redis, bound the calls/s of both layouts: the
point measured here is where Redis does the work. ``--primary-cpu F`` gives each primary a CPU
budget of its own, F of a core (a Linux CPU cgroup, root only), as if each ran on a small machine of
its own: then one primary is the bound of an unsharded service, the case sharding is for, and the
calls/s of both layouts show what the shards add.

Run: `python -m bench.bench_shards [--primaries 3] [--workers 2] [--calls 20000] [--rounds 3]
[--in-flight 64] [--primary-cpu 0.1]`.
"""

from __future__ import annotations

import argparse
import statistics
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import redis.asyncio as aioredis

from bench.bench_core import IN_FLIGHT, NUMBERS, OWN_COMMANDS, SCRIPT_COMMANDS, throughput
from bench.services.numbers import Numbers
from titan_broker import ProcessManager, WorkerOptions
from titan_broker._wire.keys import Keys, shard_scopes
from titan_broker.testing._local_cluster import ClusterNode, LocalCluster

Call = Any


@asynccontextmanager
async def service(url: str, name: str, shards: int, workers: int) -> AsyncIterator[Call]:
    """``name`` served by ``workers`` processes over ``shards`` shards; its ``add`` as one call."""
    options = WorkerOptions(shards=shards, concurrency=max(16, shards))
    async with ProcessManager(url, namespace=f"bench-{uuid.uuid4().hex[:6]}") as pm:
        proxy = await pm.spawn(NUMBERS, Numbers, name=name, options=options)
        for _ in range(workers - 1):
            await pm.spawn(NUMBERS, Numbers, name=name, options=options)
        client = pm.client

        async def knows() -> bool:  # the caller reads the shard count in the background
            return len(client._shards.known(name)) == shards

        with anyio.fail_after(30):
            while not await knows():
                await proxy.add(0, 0)
                await anyio.sleep(0.05)

        async def call(i: int) -> object:
            result = await proxy.add(i, 1)
            assert result == i + 1
            return result

        yield call


CPU_CGROUP = Path("/sys/fs/cgroup/cpu")
"""cgroup v1's CPU controller, where a group's quota caps the CPU time of the processes in it."""


@contextmanager
def cpu_budget(nodes: list[ClusterNode], cores: float | None) -> Iterator[None]:
    """Each node's redis-server held to ``cores`` of a core (None: no cap), in a CPU cgroup of its own."""
    if cores is None:
        yield
        return
    if not (CPU_CGROUP / "cpu.cfs_quota_us").exists():
        raise SystemExit(f"--primary-cpu needs cgroup v1's CPU controller at {CPU_CGROUP} (and root)")
    period = 10_000  # short, so that a capped primary is held back often and briefly, not 90 ms at once
    groups = []
    try:
        for node in nodes:
            assert node.process is not None
            group = CPU_CGROUP / f"titan-bench-{node.port}"
            group.mkdir(exist_ok=True)
            groups.append(group)
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(int(cores * period)))
            (group / "cgroup.procs").write_text(str(node.process.pid))
        yield
    finally:
        for group in groups:
            for pid in (group / "cgroup.procs").read_text().split():
                (CPU_CGROUP / "cgroup.procs").write_text(pid)
            group.rmdir()


def spread_name(cluster: LocalCluster, keys: Keys, shards: int, base: str) -> str:
    """A service name whose shards' streams are on ``shards`` different primaries."""
    for n in range(10_000):
        name = f"{base}-{n}"
        nodes = {cluster.primary_for(keys.calls(scope)).port for scope in shard_scopes(name, shards)}
        if len(nodes) == shards:
            return name
    raise RuntimeError(f"no name spreads {shards} shards over {shards} primaries")


async def node_usec(node: ClusterNode) -> int:
    """µs the node spent in commands since its last CONFIG RESETSTAT (scripts' own rows left out)."""
    client = aioredis.Redis.from_url(node.url)
    try:
        usec = 0
        for key, row in (await client.info("commandstats")).items():
            command = key.removeprefix("cmdstat_")
            if command not in OWN_COMMANDS and command not in SCRIPT_COMMANDS:
                usec += int(row["usec"])
        return usec
    finally:
        await client.aclose()


async def node_commands(node: ClusterNode) -> int:
    """Commands the node ran since its last CONFIG RESETSTAT, those scripts ran included."""
    client = aioredis.Redis.from_url(node.url)
    try:
        stats = await client.info("commandstats")
        return sum(
            int(row["calls"])
            for key, row in stats.items()
            if key.removeprefix("cmdstat_") not in OWN_COMMANDS
        )
    finally:
        await client.aclose()


async def reset(node: ClusterNode) -> None:
    client = aioredis.Redis.from_url(node.url)
    try:
        await client.config_resetstat()
    finally:
        await client.aclose()


def node_cpu(node: ClusterNode) -> float:
    assert node.process is not None
    times = psutil.Process(node.process.pid).cpu_times()
    return float(times.user + times.system)


async def one_round(call: Call, primaries: list[ClusterNode], calls: int, in_flight: int) -> dict[str, Any]:
    for node in primaries:
        await reset(node)
    cpu_before = [node_cpu(node) for node in primaries]
    rate = await throughput([call] * in_flight, calls)
    cpu = [node_cpu(node) - before for node, before in zip(primaries, cpu_before, strict=True)]
    usec = [await node_usec(node) for node in primaries]
    commands = [await node_commands(node) for node in primaries]
    n = calls // in_flight * in_flight
    return {
        "calls_per_s": rate,
        "commands_per_call": sum(commands) / n,
        "command_us_per_call": sum(usec) / n,
        "cpu_us_per_call": sum(cpu) / n * 1e6,
        "cpu_share": [c / sum(cpu) for c in cpu],
        "usec_share": [u / max(1, sum(usec)) for u in usec],
    }


async def run(args: argparse.Namespace) -> dict[int, list[dict[str, Any]]]:
    with LocalCluster(primaries=args.primaries, replicas=0) as cluster:
        primaries = sorted(cluster.primary_nodes(), key=lambda node: node.port or 0)
        keys = Keys("bench")
        layouts = {1: "hot-1", args.primaries: spread_name(cluster, keys, args.primaries, "hot")}
        results: dict[int, list[dict[str, Any]]] = {k: [] for k in layouts}
        async with AsyncExitStack() as stack:
            stack.enter_context(cpu_budget(primaries, args.primary_cpu))
            callers = {
                k: await stack.enter_async_context(service(cluster.url, name, k, args.workers))
                for k, name in layouts.items()
            }
            for call in callers.values():
                await throughput([call] * args.in_flight, args.in_flight * 10)  # warm-up
            for _ in range(args.rounds):
                for k, call in callers.items():
                    results[k].append(
                        await one_round(call, primaries, args.calls // args.rounds, args.in_flight)
                    )
        return results


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--primaries", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the service")
    parser.add_argument("--calls", type=int, default=20_000, help="calls per layout, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--in-flight", type=int, default=IN_FLIGHT, help="calls in flight (bench_core's B: 64)"
    )
    parser.add_argument(
        "--primary-cpu", type=float, default=None, help="each primary's CPU budget, in cores (root)"
    )
    args = parser.parse_args()
    results = anyio.run(run, args)
    p = args.primaries
    budget = f", each held to {args.primary_cpu:g} of a core" if args.primary_cpu else ""
    print(
        f"one service, {args.in_flight} calls in flight, {args.workers} workers, "
        f"a cluster of {p} primaries{budget}"
    )
    print(f"{'shards':>6}  {'calls/s':>22}  {'Redis CPU µs/call':>20}  {'command µs/call':>18}  "
          f"{'busiest primary (CPU)':>22}  {'commands/call':>14}  per primary (CPU, median)")  # fmt: skip
    for k, rounds in results.items():
        busiest = [max(r["cpu_share"]) for r in rounds]
        per_primary = [statistics.median(r["cpu_share"][i] for r in rounds) for i in range(p)]
        print(
            f"{k:>6}  {spread([r['calls_per_s'] for r in rounds], ',.0f'):>22}  "
            f"{spread([r['cpu_us_per_call'] for r in rounds], '.1f'):>20}  "
            f"{spread([r['command_us_per_call'] for r in rounds], '.1f'):>18}  "
            f"{spread([100 * b for b in busiest], '.0f') + ' %':>22}  "
            f"{spread([r['commands_per_call'] for r in rounds], '.1f'):>14}  "
            + " / ".join(f"{100 * s:.0f} %" for s in per_primary)
        )
    # What one service could reach if Redis were the bound: the busiest primary's CPU per call.
    print("\nprojected ceiling of one service (one core per primary, Redis CPU the bound):")
    sharded = results[p]
    cost = statistics.median(r["cpu_us_per_call"] for r in sharded)
    busiest = statistics.median(max(r["cpu_share"]) for r in sharded)
    single = statistics.median(r["cpu_us_per_call"] for r in results[1])
    print(f"  1 shard: {1e6 / single:,.0f} calls/s whatever the primaries")
    # N primaries, N shards and N/p times this load: each shard sees the load measured here (so
    # batches, and the cost per call, stay as measured) and the busiest primary does about
    # `busiest` x p / N of the work.
    for primaries in (n for n in (3, 6, 12, 24) if n >= p):
        share = busiest * p / primaries
        print(f"  {primaries:>2} primaries, {primaries} shards: {1e6 / (cost * share):,.0f} calls/s")
    print(f"median (min-max) of {args.rounds} alternating rounds of {args.calls // args.rounds} calls")


if __name__ == "__main__":
    main()
