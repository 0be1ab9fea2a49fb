"""What the README promises of jobs and errors, each under the conditions that put it to the test:
runs counted across crashes, `at=` whatever the local time zone, jobs lost with Redis's data,
results read through a short outage, typed proxies of any class, error ids that stay findable.

Real Redis (private servers), real worker processes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from titan_broker import (
    BadArguments,
    BadResult,
    CallTimeout,
    ConfigError,
    DeadLettered,
    JobCancelled,
    JobNotFound,
    ProcessManager,
    RemoteError,
    with_options,
)
from titan_broker._calling.jobs import JobState
from titan_broker._calling.proxy import Deferral
from titan_broker._errors import TitanError
from titan_broker.testing._local_redis import LocalRedis

from .conftest import CHAOS, FAST_FAILOVER, SERVICES, Workers, eventually, wait_until
from .services.promised import Color, User
from .test_cli import titan

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


AT_IN_ZONE = """
import sys
from datetime import UTC, datetime, timedelta
from titan_broker import ConfigError
from titan_broker._calling.proxy import Deferral

aware = Deferral().with_options(at=datetime.now(UTC) + timedelta(seconds=5), delay=None, deadline=None,
                                result_ttl=None)
print(round(aware.delay_now() or 0))
try:
    Deferral().with_options(at=datetime.utcnow() + timedelta(seconds=5), delay=None, deadline=None,
                            result_ttl=None)
except ConfigError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Tokyo"])
def test_at_is_an_instant_whatever_the_local_time_zone(zone: str) -> None:
    """An aware `at` is 5 s away in any zone; a naive one, which names no zone, is refused."""
    done = subprocess.run([sys.executable, "-c", AT_IN_ZONE], env={**os.environ, "TZ": zone},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    delay, refused = done.stdout.splitlines()
    assert delay == "5"
    assert refused.startswith("refused: at must be an aware datetime")


async def test_at_a_moment_just_passed_runs_now(pm: ProcessManager) -> None:
    """A moment under a millisecond ahead has passed by the time the call goes: it is not a delay."""
    soon = Deferral(at=datetime.now(UTC) + timedelta(microseconds=500)).delay_now()
    assert soon is None or soon >= 0.001
    promised = await pm.spawn(str(PROMISED))
    at = datetime.now(UTC) + timedelta(microseconds=500)
    assert await with_options(promised, at=at).slow(0) == 0
    job = await pm.submit(with_options(promised, at=datetime.now(UTC) + timedelta(microseconds=500)).slow, 0)
    assert await job.result(timeout=10) == 0


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    """A Redis of this test's own, without persistence: restarting it loses every key."""
    with LocalRedis() as server:
        yield server


async def test_a_job_lost_with_redis_data_says_so(own_redis: LocalRedis) -> None:
    async with ProcessManager(own_redis.url, namespace="lost") as pm:
        job = pm.job(await pm.client.submit("promised", "slow", (0,)))  # no worker: it stays queued
        assert (await job.status()).state is JobState.QUEUED
        own_redis.stop(kill=True)
        own_redis.start()
        with pytest.raises(JobNotFound, match=r"lost: Redis restarted or failed over .* without its data"):
            await job.result(timeout=10)
    # A process that never saw the job cannot tell lost from unknown: it names both.
    async with ProcessManager(own_redis.url, namespace="lost") as other:
        with pytest.raises(JobNotFound, match=r"never submitted, .* or Redis lost it"):
            await other.job(job.id).status()


async def test_a_job_result_rides_out_a_redis_outage_shorter_than_its_timeout(
    aof_redis: LocalRedis,
) -> None:
    async with ProcessManager(aof_redis.url, namespace="outage") as pm:
        promised = await pm.spawn(str(PROMISED))
        job = await pm.submit(promised.slow, 1.5)
        got: list[float] = []

        async def read() -> None:
            got.append(await job.result(timeout=20))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                aof_redis.stop(kill=True)
                await anyio.sleep(1.0)  # the outage itself
                aof_redis.start()
        finally:
            if aof_redis.process is None:  # the read failed during the outage: end it, for the cleanup
                aof_redis.start()
        assert got == [1.5]


class Stub:
    """The caller's view of `promised`, without @process: its annotations are what it decodes into."""

    async def users(self) -> list[User]: ...

    async def color(self) -> Color: ...


class Unusable:
    async def users(self) -> socket.socket: ...


async def test_a_proxy_of_any_class_decodes_into_its_annotations(pm: ProcessManager) -> None:
    await pm.spawn(str(PROMISED))
    stub = await pm.connect("promised", Stub)
    assert await stub.users() == [User(1, "ann")]
    with pytest.raises(BadResult, match=r"must be Color, got str \('purple'\)"):
        await stub.color()
    with pytest.raises(ConfigError, match=r"Unusable.users.*socket"):
        await pm.connect("promised", Unusable)


async def test_every_error_id_is_in_the_workers_log(pm: ProcessManager, workers: Workers) -> None:
    """The log folds repeated tracebacks, never the ids a caller may bring to an operator."""
    proc = workers.start(PROMISED)
    workers.wait_registered("promised", 1)
    ids = []
    for _ in range(5):
        with pytest.raises(RemoteError) as raised:
            await pm.client.call("promised", "boom")
        ids.append(raised.value.details["error_id"])
    wait_until(lambda: all(i.encode() in workers.output(proc) for i in ids), 10, "every id in the log")
    assert workers.output(proc).count(b"Traceback") == 1  # the traceback itself is still folded


def test_titan_call_prints_the_error_id(workers: Workers, redis_url: str, namespace: str) -> None:
    workers.start(PROMISED)
    workers.wait_registered("promised", 1)
    done = titan(redis_url, namespace, "call", "promised", "boom")
    assert done.returncode == 1
    assert re.search(r"ValueError: boom \[error [0-9a-f]{12}: its traceback is in the worker's log\]",
                     done.stderr.replace("\n", " ")), done.stderr  # fmt: skip


async def test_a_call_given_up_by_its_caller_is_not_said_to_be_taken_over(
    pm: ProcessManager, workers: Workers
) -> None:
    proc = workers.start(PROMISED)
    workers.wait_registered("promised", 1)
    with pytest.raises(CallTimeout):
        await pm.client.call("promised", "slow_sync", (3,), timeout=1)  # a thread runs on to its end

    async def told() -> bool:  # awaited, not polled in a blocking loop: the client withdraws meanwhile
        return b"given up by its caller" in workers.output(proc)

    await eventually(told, 10, "the worker to tell why")
    assert b"taken over" not in workers.output(proc), workers.output(proc)


async def test_a_call_redis_lost_is_not_said_to_be_taken_over(own_redis: LocalRedis) -> None:
    workers = Workers(own_redis.url, "lost")
    try:
        proc = workers.start(PROMISED)
        workers.wait_registered("promised", 1)
        async with ProcessManager(own_redis.url, namespace="lost") as pm:

            async def call() -> None:
                with pytest.raises(
                    TitanError
                ):  # CallLost, or a timeout: the caller's side is not tested here
                    await pm.client.call("promised", "slow_sync", (2,), timeout=8)

            async def running() -> bool:
                return bool(await pm.client.redis.xpending_range(pm.client.keys.calls("promised"), "workers",
                                                                 min="-", max="+", count=1))  # fmt: skip

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await eventually(running, 10, "the call to start")
                own_redis.stop(kill=True)
                own_redis.start()

                async def told() -> bool:
                    return b"Redis lost its data" in workers.output(proc)

                await eventually(told, 15, "the worker to tell why")
        assert b"taken over" not in workers.output(proc), workers.output(proc)
    finally:
        workers.close()


def test_booleans_are_not_seconds() -> None:
    with pytest.raises(ConfigError, match=r"delay must be a number of seconds .* got True"):
        Deferral().with_options(delay=True, at=None, deadline=None, result_ttl=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"deadline must be a number of seconds .* got True"):
        Deferral().with_options(delay=None, at=None, deadline=True, result_ttl=None)  # type: ignore[arg-type]


async def test_a_boolean_delay_or_timeout_is_refused(pm: ProcessManager) -> None:
    with pytest.raises(ConfigError, match=r"delay must be a number of seconds .* got True"):
        await pm.client.call("promised", "slow", (0,), delay=True)
    with pytest.raises(ConfigError, match=r"timeout must be a positive number of seconds, got True"):
        await pm.client.call("promised", "slow", (0,), timeout=True)


async def test_a_datetime_sent_for_a_date_is_named(pm: ProcessManager) -> None:
    await pm.spawn(str(PROMISED))
    with pytest.raises(
        BadArguments, match=r"must be date, got a datetime \(sent as str '2024-02-29T10:00:00'\)"
    ):
        await pm.client.call("promised", "day", (datetime(2024, 2, 29, 10),))


def test_titan_schedules_shows_the_last_runs_outcome(
    workers: Workers, redis_url: str, namespace: str
) -> None:
    workers.start(SERVICES / "failing_ticker.py")
    workers.wait_registered("failing-ticker", 1)

    def failed_run() -> dict[str, str] | None:
        shown = titan(redis_url, namespace, "schedules", "--json")
        [row] = json.loads(shown.stdout)
        return row if row.get("last_state") == "failed" else None

    row = wait_until(failed_run, 15, "a failed run in the schedule")
    assert row["last_error"] == "RuntimeError: the tick failed"
    table = titan(redis_url, namespace, "schedules")
    assert "failed" in table.stdout and "the tick failed" in table.stdout, table.stdout
