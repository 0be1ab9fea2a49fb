"""What the README promises of jobs and errors, each under the conditions that used to break it:
runs counted across crashes, `at=` whatever the local time zone, jobs lost with Redis's data,
results read through a short outage, typed proxies of any class, error ids that stay findable.

Real Redis (private servers), real worker processes.
"""

from __future__ import annotations

import pytest

from titan_broker import DeadLettered, JobCancelled, ProcessManager
from titan_broker.jobs import JobState

from .conftest import CHAOS, FAST_FAILOVER, SERVICES, Workers, eventually

pytestmark = pytest.mark.anyio

PROMISED = SERVICES / "promised.py"


async def test_a_job_that_killed_its_worker_twice_counts_two_runs(
    pm: ProcessManager, workers: Workers
) -> None:
    """crash() has max_deliveries 2: two runs kill two workers, the third delivery dead-letters it."""
    procs = [workers.start(CHAOS, *FAST_FAILOVER) for _ in range(3)]
    workers.wait_registered("chaos", 3)
    job = pm.job(await pm.client.submit("chaos", "crash"))
    with pytest.raises(DeadLettered, match=r"it ran 2 times and the worker running it died each time"):
        await job.result(timeout=40)
    status = await job.status()
    assert status.state is JobState.DEAD and status.attempts == 2
    workers.killed.update(p.pid for p in procs if p.poll() is not None)


async def test_a_job_cancelled_during_its_retry_backoff_says_it_ran(pm: ProcessManager) -> None:
    await pm.spawn(str(PROMISED))
    job = pm.job(await pm.client.submit("promised", "flaky"))

    async def retrying() -> bool:
        return (await job.status()).state is JobState.RETRYING

    await eventually(retrying, 10, "the first run to fail")
    assert await job.cancel()
    with pytest.raises(JobCancelled, match=r"cancelled after 1 run, waiting for its next attempt"):
        await job.result(timeout=5)
    assert (await job.status()).attempts == 1
