"""Health: a check that raises makes its worker unhealthy; a failed slot makes its service degraded."""

from __future__ import annotations

from pathlib import Path

import pytest

from titan_broker import (
    HealthStatus,
    ProcessManager,
    RestartPolicy,
    ServiceHealth,
)

from .conftest import POOLED, QUICK_HEALTH, Recorder, eventually

pytestmark = pytest.mark.anyio


# -- "a check that raises or times out is unhealthy"
async def test_a_health_check_that_raises_makes_its_worker_unhealthy(
    pm: ProcessManager, tmp_path: Path
) -> None:
    pool = await pm.pool(POOLED, dependencies={"sick_dir": str(tmp_path)}, options=QUICK_HEALTH,
                         unhealthy_threshold=1000)  # fmt: skip
    pid = pool.workers[0].pid
    flag = tmp_path / f"{pid}.raise"
    flag.touch()

    async def health_is(status: HealthStatus) -> ServiceHealth | None:
        health = await pm.health("pooled")
        return health if health.status == status else None

    health = await eventually(lambda: health_is(HealthStatus.UNHEALTHY), 10, "an unhealthy service")
    [worker] = health.workers
    assert "health() raised ConnectionError: the database is gone" in worker["details"]["error"]
    assert await pool.proxy.sleep(0) == pid  # unhealthy, still serving
    flag.unlink()
    await eventually(lambda: health_is(HealthStatus.HEALTHY), 10, "the worker to recover")


# -- "degraded (some unhealthy or a failed slot)"
async def test_a_failed_slot_makes_the_service_degraded(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, size=2, restart=RestartPolicy(max_restarts=0, backoff=0.1))
    crashed = await pool.proxy.exit_soon()
    [failed] = await recorder.wait_for("failed")
    assert failed.pid == crashed and pool.failed == 1

    async def without_the_dead_worker() -> ServiceHealth | None:
        health = await pm.health("pooled")
        return (
            health if [w["pid"] for w in health.workers] != [crashed] and len(health.workers) == 1 else None
        )

    health = await eventually(without_the_dead_worker, 10, "the crashed worker to leave")
    assert (health.status, health.healthy, health.failed) == (HealthStatus.DEGRADED, 1, 1)
