"""The nemesis run's short form: a fixed seed, about 90 s per topology (a single Redis with AOF, a
Cluster with replicas, a primary and a replica behind three Sentinels), every invariant checked.

A mixed workload from caller processes while faults drawn from the seed hit workers, callers and
Redis (tests/nemesis/); the checker reads the history and names any broken invariant with the
ids at fault. The long form: ``python -m tests.nemesis --minutes 30 --seed N --topology ...``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import skip_without_cluster_binaries
from .nemesis.run import RunConfig, run

pytestmark = pytest.mark.slow

SECONDS = 75.0
"""The workload's time under faults; setting up, healing and reading back take the rest."""


def _short_form(topology: str, seed: int, folder: Path) -> None:
    verdict = run(RunConfig(seconds=SECONDS, seed=seed, topology=topology, folder=folder))
    print(f"\nnemesis {topology} seed {seed}:\n{verdict.summary()}")
    stats = verdict.stats
    # The run proved something: calls, jobs and ticks checked, faults of several kinds done.
    assert stats["calls"] > 500 and stats["jobs"] > 50 and stats["tick_jobs"] > 20, stats
    assert len(set(stats["faults"]) - {"lapse"}) >= 3, stats["faults"]
    assert verdict.ok, verdict.summary()


@pytest.mark.timeout(240)
def test_nemesis_on_a_single_redis_with_aof(tmp_path: Path) -> None:
    _short_form("single", 4242, tmp_path)


@pytest.mark.timeout(300)
def test_nemesis_on_a_cluster_with_replicas(tmp_path: Path) -> None:
    skip_without_cluster_binaries()
    _short_form("cluster", 777, tmp_path)


@pytest.mark.timeout(300)
def test_nemesis_behind_sentinel(tmp_path: Path) -> None:
    skip_without_cluster_binaries()
    _short_form("sentinel", 5, tmp_path)
