"""Background jobs: submit and come back later, delays, retries with backoff, periodic ticks.

Real Redis, real worker processes. Each run of a test service appends a line to a log file, so a
test can count runs (at least once, never twice without a crash) and read when they happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import redis as sync_redis

from titan_broker import (
    BacklogFull,
    CircuitBreaker,
    CircuitOpen,
    ConfigError,
    DeadLettered,
    DeadlineExceeded,
    JobCancelled,
    JobNotFound,
    MethodNotFound,
    ProcessManager,
    RemoteError,
    periodic,
    process,
    retry,
    with_options,
)
from titan_broker._calling.jobs import JobState
from titan_broker._calling.proxy import CallTiming
from titan_broker._registry.records import list_workers
from titan_broker._service.definition import describe
from titan_broker._wire.keys import Keys
from titan_broker.testing._local_redis import LocalRedis

from .conftest import CHAOS, FAST_FAILOVER, ROOT, SERVICES, Workers, eventually, run_log, titan, wait_until

pytestmark = pytest.mark.anyio

TASKS = SERVICES / "tasks.py"
TICKER = SERVICES / "ticker.py"


def runs(log: Path, what: str, tag: str | None = None) -> list[list[str]]:
    """The log's lines for ``what`` (and ``tag``), split: [what, tag, pid, time]."""
    return [line for line in run_log(log) if line[0] == what and (tag is None or line[1] == tag)]


async def test_a_job_outlives_its_caller_and_is_read_by_another_process(
    pm: ProcessManager, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    await pm.spawn(TASKS, dependencies={"log": str(log)})
    # Another process submits and exits at once, without waiting for the job.
    script = (
        "import anyio, sys\n"
        "from titan_broker import Client\n"
        "async def main():\n"
        f"    async with Client({redis_url!r}, namespace={namespace!r}) as client:\n"
        "        print(await client.submit('tasks', 'slow', (1.0, 'outlived')))\n"
        "anyio.run(main)\n"
    )
    command = [sys.executable, "-c", script]
    done = await anyio.to_thread.run_sync(
        lambda: subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.startswith("tasks:")
    job = pm.job(job_id)
    assert await job.result(timeout=15) == "outlived"
    status = await job.status()
    assert status.state is JobState.DONE and status.attempts == 1
    assert status.submitted and status.started and status.finished
    assert status.submitted <= status.started <= status.finished
    assert len(runs(log, "end", "outlived")) == 1


async def test_a_typed_job_result_and_its_remote_error(pm: ProcessManager, tmp_path: Path) -> None:
    from tests.services.tasks import Tasks

    tasks = await pm.spawn(TASKS, Tasks, dependencies={"log": str(tmp_path / "runs")})
    job = await pm.submit(tasks.add, 5, 3)
    assert await job.result(timeout=10) == 8.0
    failing = await pm.submit(tasks.wrong_error, "typed")
    with pytest.raises(RemoteError) as info:
        await failing.result(timeout=10)
    assert info.value.type == "ValueError"
    assert (await failing.status()).state is JobState.FAILED


async def test_results_expire_after_their_result_ttl(pm: ProcessManager, tmp_path: Path) -> None:
    from tests.services.tasks import Tasks

    tasks = await pm.spawn(TASKS, Tasks, dependencies={"log": str(tmp_path / "runs")})
    job = await pm.submit(with_options(tasks, result_ttl=1).add, 1, 2)
    assert await job.result(timeout=10) == 3.0

    async def gone() -> bool:
        try:
            await job.status()
            return False
        except JobNotFound:
            return True

    await eventually(gone, 5, "the job's outcome to expire")
    with pytest.raises(JobNotFound, match="result_ttl"):
        await job.result(timeout=1)
    assert all(j.id != job.id for j in await pm.jobs("tasks"))


async def test_a_job_cancelled_before_it_started_never_runs(
    pm: ProcessManager, workers: Workers, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    job_id = await pm.client.submit("tasks", "add", (1, 1), {"tag": "cancelled"})  # no worker yet
    job = pm.job(job_id)
    assert (await job.status()).state is JobState.QUEUED
    assert await job.cancel() is True
    assert (await job.status()).state is JobState.CANCELLED
    workers.start(TASKS, "--dep", f"log={json.dumps(str(log))}")
    after = pm.job(await pm.client.submit("tasks", "add", (2, 2), {"tag": "after"}))
    assert await after.result(timeout=20) == 4.0  # the queue was read past where the cancelled job was
    assert runs(log, "add", "cancelled") == []
    with pytest.raises(JobCancelled):
        await job.result(timeout=1)
    assert await after.cancel() is False  # it ran: too late to cancel


async def test_a_delayed_job_runs_no_earlier_than_its_delay_and_at_most_a_second_late(
    pm: ProcessManager, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    await pm.spawn(TASKS, dependencies={"log": str(log)})
    job = pm.job(await pm.client.submit("tasks", "add", (1, 2), {"tag": "delayed"}, delay=2.0))
    status = await job.status()
    assert status.state is JobState.QUEUED and status.due is not None and status.submitted is not None
    assert 1.99 <= (status.due - status.submitted).total_seconds() <= 2.01
    assert await job.result(timeout=10) == 3.0
    status = await job.status()
    assert status.started is not None and status.due is not None
    late = (status.started - status.due).total_seconds()
    assert -0.05 <= late <= 1.0, late  # the worker's clock estimate of Redis's: a few ms either way


async def test_a_delayed_call_waits_for_its_delay_and_runs_once(pm: ProcessManager, tmp_path: Path) -> None:
    from tests.services.tasks import Tasks

    log = tmp_path / "runs"
    tasks = await pm.spawn(TASKS, Tasks, dependencies={"log": str(log)})
    started = time.monotonic()
    assert await with_options(tasks, delay=1.0, timeout=5).add(2, 2, "delayed-call") == 4.0
    assert 1.0 <= time.monotonic() - started < 3.0
    await anyio.sleep(0.75)  # the worker looks at the delayed set every 0.25 s: three more looks
    assert len(runs(log, "add", "delayed-call")) == 1


async def test_retries_back_off_then_the_last_error_is_the_jobs(pm: ProcessManager, tmp_path: Path) -> None:
    from tests.services.tasks import Tasks

    log = tmp_path / "runs"
    tasks = await pm.spawn(TASKS, Tasks, dependencies={"log": str(log)})
    recovers = await pm.submit(tasks.flaky, 1, "recovers")
    gives_up = await pm.submit(tasks.flaky, 5, "gives-up")
    assert await recovers.result(timeout=15) == "ok after 2"
    with pytest.raises(RemoteError) as info:
        await gives_up.result(timeout=15)
    assert info.value.type == "ConnectionError" and "run 3 of gives-up" in info.value.message  # the last
    status = await gives_up.status()
    assert status.state is JobState.FAILED and status.attempts == 3
    times = [float(line[3]) for line in runs(log, "flaky", "gives-up")]
    assert len(times) == 3
    # backoff 0.3 s, doubled: the runs are queued again, not looped in place.
    assert times[1] - times[0] >= 0.3 and times[2] - times[1] >= 0.6, times
    # A plain call retries the same way; an exception @retry does not list is not retried.
    assert await tasks.flaky(1, "call") == "ok after 2"
    with pytest.raises(RemoteError, match="not retried"):
        await tasks.wrong_error("once")
    assert len(runs(log, "wrong", "once")) == 1

    async def retries_counted() -> bool:  # the registry's numbers are refreshed every heartbeat
        records = await list_workers(pm.client.redis, pm.client.keys, "tasks")
        return sum(int(r.metrics.get("flaky", {}).get("retries", 0)) for r in records) == 1 + 2 + 1

    await eventually(retries_counted, 5, "the retries in the worker's metrics")


async def test_a_job_survives_its_worker_killed_mid_run(
    pm: ProcessManager, workers: Workers, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    first = workers.start(TASKS, "--dep", f"log={json.dumps(str(log))}", "--heartbeat-ttl", "2")
    workers.wait_registered("tasks", 1)
    job = pm.job(await pm.client.submit("tasks", "slow", (2.0, "killed")))
    wait_until(lambda: runs(log, "start", "killed"), 10, "the job to start")
    workers.start(TASKS, "--dep", f"log={json.dumps(str(log))}", "--heartbeat-ttl", "2")
    workers.wait_registered("tasks", 2)
    workers.kill(first)
    assert await job.result(timeout=20) == "killed"
    ends = runs(log, "end", "killed")
    assert len(ends) == 1 and int(ends[0][2]) != first.pid  # completed once, elsewhere
    status = await job.status()
    assert status.state is JobState.DONE and status.attempts == 2  # the run cut by the kill counts


@pytest.mark.timeout(90)
async def test_periodic_runs_once_per_tick_across_three_workers_and_a_killed_one(
    workers: Workers, tmp_path: Path
) -> None:
    log = tmp_path / "ticks"
    procs = [workers.start(TICKER, "--dep", f"log={json.dumps(str(log))}") for _ in range(3)]
    workers.wait_registered("ticker", 3)
    wait_until(lambda: len(runs(log, "tick")) >= 10, 20, "ten ticks")  # ten seconds of ticks
    ticks = [_tick(line) for line in runs(log, "tick")]
    per_second = Counter(int(at) for _, at in ticks)
    assert max(per_second.values()) == 1, per_second  # never two runs of one tick
    # The worker that ran the last tick dies; the next ticks still run, on the others.
    victim = next(p for p in procs if p.pid == ticks[-1][0])
    workers.kill(victim)
    killed_at = time.time()
    wait_until(lambda: sum(1 for _, at in map(_tick, runs(log, "tick")) if at > killed_at) >= 3, 15,
               "three more ticks after the kill")  # fmt: skip
    after = [pid for pid, at in map(_tick, runs(log, "tick")) if at > killed_at]
    assert victim.pid not in after
    all_ticks = Counter(int(at) for _, at in map(_tick, runs(log, "tick")))
    assert max(all_ticks.values()) == 1, all_ticks


def _tick(line: list[str]) -> tuple[int, float]:
    return int(line[2]), float(line[3])


async def test_the_cli_lists_jobs_shows_one_and_lists_schedules(
    pm: ProcessManager, workers: Workers, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    from tests.services.tasks import Tasks

    tasks = await pm.spawn(TASKS, Tasks, dependencies={"log": str(tmp_path / "runs")})
    ok = await pm.submit(tasks.add, 1, 2)
    failed = await pm.submit(tasks.wrong_error, "cli")
    await ok.result(timeout=10)
    with pytest.raises(RemoteError):
        await failed.result(timeout=10)
    listed = titan(redis_url, namespace, "jobs", "tasks", "--status", "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)] == [failed.id]
    shown = titan(redis_url, namespace, "job", ok.id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["result"] == 3.0 and json.loads(shown.stdout)["state"] == "done"
    assert titan(redis_url, namespace, "job", failed.id).returncode == 1
    assert titan(redis_url, namespace, "job", "not-a-job-id").returncode == 2
    workers.start(TICKER, "--dep", f"log={json.dumps(str(tmp_path / 'ticks'))}")
    workers.wait_registered("ticker", 1)
    schedules = titan(redis_url, namespace, "schedules", "--json")
    assert schedules.returncode == 0, schedules.stderr
    [row] = json.loads(schedules.stdout)
    assert (row["service"], row["method"], row["schedule"]) == ("ticker", "tick", "every 1 s")


def test_periodic_and_retry_refuse_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="every=<seconds> or cron"):
        periodic()
    with pytest.raises(ConfigError, match="not a cron expression"):
        periodic(cron="every tuesday")(lambda: None)
    with pytest.raises(ConfigError, match="attempts >= 2"):
        retry(attempts=1)
    with pytest.raises(ConfigError, match="exception classes"):
        retry(on=(42,))  # type: ignore[arg-type]

    @process(name="needs-args")
    class NeedsArgs:
        @periodic(every=5)
        async def report(self, day: str) -> None: ...

    with pytest.raises(ConfigError, match="required arguments \\(day\\)"):
        describe(NeedsArgs)


def test_cron_ticks_fall_where_the_expression_says() -> None:
    from titan_broker._service.decorators import PeriodicOptions

    every_five = PeriodicOptions(cron="*/5 * * * *")
    at = 1_800_000_123_456  # some ms after a tick
    tick = every_five.tick_at_or_before(at)
    assert tick % 300_000 == 0 and at - 300_000 < tick <= at
    assert every_five.tick_after(tick) == tick + 300_000
    assert PeriodicOptions(every=60).tick_at_or_before(at) == at - at % 60_000


async def test_a_job_that_kills_its_workers_is_dead_lettered_and_says_so(
    pm: ProcessManager, workers: Workers
) -> None:
    """The same rules as a call: delivered more than max_deliveries times (its workers died on it)."""
    procs = [workers.start(CHAOS, *FAST_FAILOVER, "--max-deliveries", "1") for _ in range(2)]
    workers.wait_registered("chaos", 2)
    job = pm.job(await pm.client.submit("chaos", "crash"))
    with pytest.raises(DeadLettered, match=r"max_deliveries 1"):
        await job.result(timeout=30)
    assert (await job.status()).state is JobState.DEAD
    assert len(await pm.dead_letters("chaos")) == 1
    workers.killed.update(p.pid for p in procs if p.poll() is not None)


async def test_a_job_past_its_own_deadline_fails_with_deadline_exceeded(
    pm: ProcessManager, tmp_path: Path
) -> None:
    from tests.services.tasks import Tasks

    tasks = await pm.spawn(TASKS, Tasks, dependencies={"log": str(tmp_path / "runs")})
    job = await pm.submit(with_options(tasks, deadline=0.5).slow, 5.0, "too-slow")
    with pytest.raises(DeadlineExceeded):
        await job.result(timeout=10)
    assert (await job.status()).state is JobState.FAILED


async def test_a_job_for_a_method_nobody_has_fails_with_method_not_found(
    pm: ProcessManager, tmp_path: Path
) -> None:
    await pm.spawn(TASKS, dependencies={"log": str(tmp_path / "runs")})
    job = pm.job(await pm.client.submit("tasks", "no_such_method"))
    with pytest.raises(MethodNotFound):
        await job.result(timeout=10)
    assert (await job.status()).state is JobState.FAILED


def small_backlog(redis_url: str, namespace: str, limit: int) -> ProcessManager:
    """A manager whose client refuses calls past ``limit`` waiting (when no worker says otherwise)."""
    manager = ProcessManager(redis_url, namespace=namespace)
    manager.client.max_backlog = limit  # read when it connects
    return manager


async def test_delayed_calls_count_in_the_backlog(redis_url: str, namespace: str) -> None:
    """What waits for later waits all the same: a full backlog refuses delayed jobs and calls too."""
    async with small_backlog(redis_url, namespace, 3) as pm:
        for i in range(3):
            await pm.client.submit("nobody", "m", (i,), delay=60)
        with pytest.raises(BacklogFull, match="max_backlog=3"):
            await pm.client.submit("nobody", "m", (4,), delay=60)
        with pytest.raises(BacklogFull):
            await pm.client.call("nobody", "m", timeout=5, delay=60)


async def test_a_submit_goes_through_the_proxys_circuit_breaker(redis_url: str, namespace: str) -> None:
    from tests.services.tasks import Tasks

    async with small_backlog(redis_url, namespace, 1) as pm:
        tasks = await pm.connect("nobody", Tasks, breaker=CircuitBreaker(failures=1, reset_after=60))
        await pm.submit(tasks.add, 1, 1)  # queued: nobody serves it
        with pytest.raises(BacklogFull):
            await pm.submit(tasks.add, 2, 2)
        with pytest.raises(CircuitOpen):
            await pm.submit(tasks.add, 3, 3)


async def test_a_job_waits_for_a_worker_longer_than_its_submit_took(
    pm: ProcessManager, workers: Workers, tmp_path: Path
) -> None:
    """The submit's timeout bounds the submit, not the job: queued longer, it still runs."""
    job = pm.job(await pm.client.submit("tasks", "add", (2, 3), timeout=0.5))
    await anyio.sleep(1.0)  # the submit's deadline is long gone
    workers.start(TASKS, "--dep", f"log={json.dumps(str(tmp_path / 'runs'))}")
    assert await job.result(timeout=20) == 5.0


# -- at their edges: a last tick far ahead, long runs, callers that gave up, options out of range ---


async def test_a_schedule_survives_a_last_tick_written_far_ahead(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """A worker whose clock jumped ahead wrote a tick ten minutes from now: the others go on."""
    sync_client.hset(keys.schedule("ticker"), "tick:last", str(int(time.time() * 1000) + 600_000))
    log = tmp_path / "ticks"
    workers.start(TICKER, "--dep", f"log={json.dumps(str(log))}")
    wait_until(lambda: len(runs(log, "tick")) >= 2, 15, "two ticks")


async def test_long_periodic_runs_are_not_cut_and_any_method_name_runs(
    workers: Workers, pm: ProcessManager, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    workers.start(SERVICES / "slow_ticker.py", "--dep", f"log={json.dumps(str(log))}")
    wait_until(lambda: len(runs(log, "end", "long")) >= 2 and len(runs(log, "größe")) >= 2, 20,
               "two long runs ended and two runs of größe")  # fmt: skip
    assert not [j for j in await pm.jobs("slow_ticker") if j.state in (JobState.FAILED, JobState.DEAD)]


async def test_a_retried_call_whose_caller_gave_up_is_not_run_again(
    pm: ProcessManager, tmp_path: Path
) -> None:
    from tests.services.tasks import Tasks

    log = tmp_path / "runs"
    tasks = await pm.spawn(TASKS, Tasks, dependencies={"log": str(log)})
    with anyio.move_on_after(0.2):  # the first run fails at once; its retry is due in 0.3 s
        await tasks.flaky(10, "gave-up")
    await anyio.sleep(1.5)  # the retries (0.3 s, then 0.6 s) would have run by now
    assert len(runs(log, "flaky", "gave-up")) == 1


async def test_a_retry_that_could_not_start_before_the_deadline_is_not_queued(
    pm: ProcessManager, tmp_path: Path
) -> None:
    """flaky's next run would start 0.3 s after the first: past a 0.29 s deadline, so the caller
    gets the first run's error at once, and the call never runs again."""
    from tests.services.tasks import Tasks

    log = tmp_path / "runs"
    tasks = await pm.spawn(TASKS, Tasks, dependencies={"log": str(log)})
    with pytest.raises(RemoteError) as info:
        await with_options(tasks, timeout=0.29).flaky(5, "no-time")
    assert info.value.type == "ConnectionError" and "run 1 of no-time" in info.value.message
    await anyio.sleep(0.8)  # a retry queued anyway would have been due and promoted by now
    assert len(runs(log, "flaky", "no-time")) == 1


async def test_job_options_and_ids_out_of_range_are_clear_errors(pm: ProcessManager, tmp_path: Path) -> None:
    from tests.services.tasks import Tasks

    tasks = await pm.spawn(TASKS, Tasks, dependencies={"log": str(tmp_path / "runs")})
    for options in ({"deadline": 1e9}, {"delay": float("nan")}, {"result_ttl": 1e-4}, {"delay": 1e12}):
        with pytest.raises(ConfigError, match="seconds"):
            await pm.client.submit("tasks", "add", (1, 2), **options)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seconds"):
        with_options(tasks, result_ttl=float("inf"))
    for bad in ("tasks:tok\n", "ауд:tok", "a}{b:tok"):
        with pytest.raises(ConfigError, match="not a job id"):
            pm.job(bad)
    done = await pm.submit(tasks.add, 1, 1)
    await done.result(timeout=10)
    assert await done.result(timeout=0) == 2.0  # an ended job is read even with no time to wait


PROMISED = SERVICES / "promised.py"


AT_IN_ZONE = """
import sys
from datetime import UTC, datetime, timedelta
from titan_broker import ConfigError
from titan_broker._calling.proxy import CallTiming

aware = CallTiming().with_options(at=datetime.now(UTC) + timedelta(seconds=5), delay=None, deadline=None,
                                result_ttl=None)
print(round(aware.delay_now() or 0))
try:
    CallTiming().with_options(at=datetime.utcnow() + timedelta(seconds=5), delay=None, deadline=None,
                            result_ttl=None)
except ConfigError as exc:
    print("refused:", exc)
"""


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
    soon = CallTiming(at=datetime.now(UTC) + timedelta(microseconds=500)).delay_now()
    assert soon is None or soon >= 0.001
    promised = await pm.spawn(str(PROMISED))
    at = datetime.now(UTC) + timedelta(microseconds=500)
    assert await with_options(promised, at=at).slow(0) == 0
    job = await pm.submit(with_options(promised, at=datetime.now(UTC) + timedelta(microseconds=500)).slow, 0)
    assert await job.result(timeout=10) == 0


async def test_a_job_lost_with_redis_data_says_so(private_redis: LocalRedis) -> None:
    async with ProcessManager(private_redis.url, namespace="lost") as pm:
        job = pm.job(await pm.client.submit("promised", "slow", (0,)))  # no worker: it stays queued
        assert (await job.status()).state is JobState.QUEUED
        private_redis.stop(kill=True)
        private_redis.start()
        with pytest.raises(JobNotFound, match=r"lost: Redis restarted or failed over .* without its data"):
            await job.result(timeout=10)
    # A process that never saw the job cannot tell lost from unknown: it names both.
    async with ProcessManager(private_redis.url, namespace="lost") as other:
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


async def test_a_stale_run_starting_after_the_job_ended_leaves_it_ended(
    pm: ProcessManager, workers: Workers, tmp_path: Path, keys: Keys
) -> None:
    """A run of a job's entry that starts after another run finished the job (the entry was
    reclaimed from a stalled worker, which then resumed) must not move the job back to running."""
    log = tmp_path / "runs"
    job = pm.job(await pm.client.submit("tasks", "slow", (1.5, "stale"), timeout=60))  # no worker yet
    client = sync_redis.Redis.from_url(workers.url)
    try:
        [(_id, fields)] = client.xrange(keys.calls("tasks"))  # the request, as a stalled worker held it
        workers.start(TASKS, "--dep", f"log={json.dumps(str(log))}")
        assert await job.result(timeout=20) == "stale"
        client.xadd(keys.calls("tasks"), fields)  # the stale run: the same job's request again
        wait_until(lambda: len(runs(log, "start", "stale")) == 2, 10, "the stale run to start")
        status = await job.status()
        assert status.state is JobState.DONE, status
        wait_until(lambda: len(runs(log, "end", "stale")) == 2, 10, "the stale run to end")
        assert (await job.status()).state is JobState.DONE
        assert await job.result(timeout=5) == "stale"
    finally:
        client.close()
