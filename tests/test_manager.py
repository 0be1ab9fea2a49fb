"""The process manager: worker options and concurrency, the pools it keeps."""

from __future__ import annotations

import pytest

from titan_broker import ConfigError, Event, ProcessManager, WorkerOptions
from titan_broker._processes.policies import (
    worker_options,
)

from .conftest import SERVICES, eventually, managed_workers

POOLED = str(SERVICES / "pooled.py")


pytestmark = pytest.mark.anyio


async def _concurrency(pm: ProcessManager, service: str) -> int:
    [worker] = pm.workers
    raw = await pm.client.redis.hget(pm.client.keys.worker(service, worker.worker_id), "concurrency")
    assert raw is not None
    return int(raw)


# -- concurrency: the keyword, options, the default ------------------------------------------
async def test_spawn_keeps_the_concurrency_of_its_options(pm: ProcessManager) -> None:
    await pm.spawn(POOLED, options=WorkerOptions(concurrency=4))
    assert await _concurrency(pm, "pooled") == 4  # was overridden by the keyword's default of 16


async def test_the_concurrency_keyword_wins_over_the_default(pm: ProcessManager) -> None:
    await pm.spawn(POOLED, concurrency=3, options=WorkerOptions(heartbeat_ttl=6.0))
    assert await _concurrency(pm, "pooled") == 3


async def test_a_conflicting_concurrency_is_refused_before_anything_starts(pm: ProcessManager) -> None:
    with pytest.raises(ConfigError) as info:
        await pm.pool(POOLED, concurrency=3, options=WorkerOptions(concurrency=4))
    assert "concurrency=3" in str(info.value) and "WorkerOptions(concurrency=4)" in str(info.value)
    assert managed_workers() == [] and pm.pools == []


def test_worker_options_resolution() -> None:
    assert worker_options(None, None) == WorkerOptions()
    assert worker_options(None, 5).concurrency == 5
    explicit = WorkerOptions(concurrency=4, grace_period=2.0)
    assert worker_options(explicit, None) is explicit
    assert worker_options(explicit, 4) is explicit  # the same value twice is no conflict
    assert worker_options(WorkerOptions(grace_period=2.0), 8) == WorkerOptions(
        concurrency=8, grace_period=2.0
    )
    with pytest.raises(ConfigError, match="concurrency=8 conflicts"):
        worker_options(explicit, 8)


# -- the pool's list in the manager ----------------------------------------------------------
async def test_a_pool_closed_by_its_user_leaves_the_manager(pm: ProcessManager) -> None:
    pool = await pm.pool(POOLED)
    assert pm.pools == [pool] and len(pm.workers) == 1
    assert await pool.proxy.sleep(0) == pool.workers[0].pid
    await pool.close(timeout=10)
    assert pm.pools == [] and pm.workers == [] and pool.workers == []
    assert (await pm.health("pooled")).failed == 0


async def test_a_worker_stopped_through_the_manager_is_stopped_not_crashed_and_not_restarted(
    pm: ProcessManager,
) -> None:
    await pm.spawn(POOLED)  # the default restart policy restarts a worker that crashes
    [worker] = pm.workers
    events: list[Event] = []
    pm.on_event(events.append)
    assert await pm.stop_worker(worker, timeout=10) == 0

    async def exit_seen() -> list[str]:
        mine = [e.kind for e in events if e.worker_id == worker.worker_id]
        return [kind for kind in mine if kind in ("stopped", "crashed")]

    assert await eventually(exit_seen, 10, "the worker's exit seen by its pool") == ["stopped"]
    assert pm.workers == [] and [pool.size for pool in pm.pools] == [0]


async def test_a_pool_stops_only_its_own_running_workers(pm: ProcessManager) -> None:
    pool = await pm.pool(POOLED, size=2)
    other = await pm.pool(str(SERVICES / "pooled.py"), name="pooled-b")
    first = pool.workers[0]
    assert await pool.stop_worker(first, timeout=10) == 0
    with pytest.raises(ConfigError, match="not a running worker of this pool"):
        await pool.stop_worker(first, timeout=10)  # stopped already
    with pytest.raises(ConfigError, match="not a running worker of this pool"):
        await pool.stop_worker(other.workers[0], timeout=10)  # another pool's
    assert pool.size == 1 and len(pool.workers) == 1 and other.size == 1 and len(other.workers) == 1
