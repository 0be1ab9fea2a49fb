"""What the Redis Cluster path costs: bench_core's B workload on one node and on a 3-primary cluster.

B: 64 calls in flight from one process, 2 worker processes per service (bench_core's harness
and throughput loop, imported, not copied). Measured with 1 service, and with 3 services whose
hash tags land on 3 different primaries (the 64 callers spread over them, 2 workers each). One
private redis-server and one private cluster run side by side, and the rounds alternate between
them, so that drift on a shared, noisy machine hits both alike.

The cluster has no replicas by default: on a 2-core machine a replica applying every write
takes CPU from the rest, and the point is the cost of the client's and workers' cluster path
(``--replicas 1`` measures with them).

Run: `python -m bench.bench_cluster [--calls 10000] [--rounds 4] [--replicas 0]`.
"""

from __future__ import annotations

import argparse
from contextlib import AsyncExitStack

import anyio

from bench.bench_core import IN_FLIGHT, Call, throughput, titan
from titan_broker.testing._local_cluster import LocalCluster
from titan_broker.testing._local_redis import LocalRedis

TARGET = 0.85
"""The target: the cluster at most 15 % below one node, for 1 service."""


async def measure(urls: dict[str, str], names: list[str], calls: int, rounds: int) -> dict[str, list[float]]:
    """calls/s per round for each deployment in ``urls``, serving the services ``names``."""
    async with AsyncExitStack() as stack:
        callers: dict[str, list[Call]] = {}
        for label, url in urls.items():
            ones: list[Call] = []
            for name in names:
                one, _, second_worker, _ = await stack.enter_async_context(titan(url, name))
                await second_worker()
                ones.append(one)
            callers[label] = [ones[k % len(ones)] for k in range(IN_FLIGHT)]
        for many in callers.values():
            await throughput(many, IN_FLIGHT * 10)  # warm-up: connections, scripts, slot maps
        rates: dict[str, list[float]] = {label: [] for label in urls}
        for _ in range(rounds):
            for label, many in callers.items():
                rates[label].append(await throughput(many, calls // rounds))
        return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=10_000, help="calls per configuration, over all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=0, help="replicas per primary in the cluster")
    args = parser.parse_args()
    with LocalRedis() as single, LocalCluster(primaries=3, replicas=args.replicas) as cluster:
        urls = {"one node": single.url, "cluster": cluster.url}
        spread = cluster.names_on_distinct_primaries(["calc-a", "calc-b", "calc-c"])
        results = {
            "1 service": anyio.run(measure, urls, ["calculator"], args.calls, args.rounds),
            "3 services": anyio.run(measure, urls, spread, args.calls, args.rounds),
        }
    report(results, args.calls, args.rounds, args.replicas, spread)


def report(
    results: dict[str, dict[str, list[float]]], calls: int, rounds: int, replicas: int, spread: list[str]
) -> None:
    print(
        f"B workload: {IN_FLIGHT} calls in flight, 2 workers per service, {calls} calls per "
        f"configuration in {rounds} alternating rounds; cluster: 3 primaries, "
        f"{replicas} replica(s) each; 3 services on 3 primaries: {', '.join(spread)}"
    )
    print(f"{'calls/s':24}{'one node':>12}{'cluster':>12}{'cluster/one':>14}")
    for workload, rates in results.items():
        one, many = (sum(rates[k]) / len(rates[k]) for k in ("one node", "cluster"))
        print(f"{workload:24}{one:12,.0f}{many:12,.0f}{many / one:14.2f}")
    for workload, rates in results.items():
        per_round = ", ".join(f"{k} {[round(x) for x in v]}" for k, v in rates.items())
        print(f"{workload} per round: {per_round}")
    print(f"target: 1 service, cluster/one >= {TARGET:.2f}")


if __name__ == "__main__":
    main()
