"""@periodic schedules and delayed calls at their edges: missed ticks, schedules that cannot tick,
outages, draining workers, short delays.

Real Redis, real worker processes. Each run of a test service appends a line to a log file
(``<what> - <pid> <time>``), so a test can count runs and read when they started.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as sync_redis
from croniter import croniter

from titan_broker import (
    ConfigError,
    ProcessManager,
    periodic,
    process,
)
from titan_broker._wire.keys import GROUP, Keys

from .conftest import FAST_FAILOVER, SERVICES, Workers, run_log, run_log_dep, titan, wait_until

pytestmark = pytest.mark.anyio

BROKEN = SERVICES / "broken_schedule.py"
SPARSE = SERVICES / "sparse_ticker.py"
PILING = SERVICES / "piling_ticker.py"
TASKS = SERVICES / "tasks.py"


def runs(log: Path, what: str, pid: int | None = None) -> list[float]:
    """When the runs logged as ``what`` (by ``pid``) started, in the order they were logged."""
    return [float(at) for name, _, by, at in run_log(log) if name == what and (pid is None or int(by) == pid)]


def schedule(client: sync_redis.Redis, keys: Keys, service: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.schedule(service)).items()}


# -- schedules that cannot tick are refused, and one that fails stops nothing else --------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"cron": "0 0 30 2 *"}, "never matches"),
        ({"cron": "0 0 31 4 *"}, "never matches"),
        ({"cron": "every tuesday"}, "not a cron expression"),
        ({"cron": 5}, "cron expression"),
        ({"every": float("nan")}, "every"),
        ({"every": float("inf")}, "every"),
        ({"every": True}, "every"),
        ({"every": 0}, "every"),
        ({"every": -3}, "every"),
        ({"every": "5"}, "every"),
        ({"every": 5, "result_ttl": float("nan")}, "result_ttl"),
    ],
)
def test_a_schedule_that_cannot_tick_is_refused_naming_its_method(
    options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as refused:

        @process(name="bad")
        class Bad:
            @periodic(**options)
            async def nightly(self) -> None: ...

    assert "Bad.nightly" in str(refused.value)


def test_rare_but_real_schedules_are_accepted() -> None:
    @process(name="rare")
    class Rare:
        @periodic(cron="0 0 29 2 *")  # every fourth year
        async def leap_day(self) -> None: ...

        @periodic(every=0.1)
        async def often(self) -> None: ...


@pytest.mark.timeout(60)
async def test_a_schedule_that_cannot_tick_stops_neither_the_others_nor_delayed_calls(
    pm: ProcessManager, workers: Workers, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    proc = workers.start(BROKEN, *run_log_dep(log))
    workers.wait_registered("broken_schedule", 1)
    wait_until(lambda: len(runs(log, "tick")) >= 3, 15, "three ticks of the sibling schedule")
    late = []
    for _ in range(3):
        job = pm.job(await pm.client.submit("broken_schedule", "stamp", (), {}, delay=0.3))
        await job.result(timeout=10)
        status = await job.status()
        assert status.started is not None and status.due is not None
        late.append((status.started - status.due).total_seconds())
    assert max(late) < 0.5, late
    said = [line for line in workers.output(proc).decode().splitlines() if "a_broken" in line]
    assert said and len(said) <= 2, said  # said once (throttled), not on every pass


# -- ticks missed while no worker ticked are not made up ------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_cron_whose_last_match_is_hours_ago_does_not_run_at_start(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    now = datetime.now(UTC)
    workers.start(SPARSE, *run_log_dep(log))
    workers.wait_registered("sparse_ticker", 1)
    # The worker looked at both cron schedules, and ran a tick of the every-4-s method after.
    looked = ("nightly:last", "yearly:last")
    wait_until(lambda: set(looked) <= schedule(sync_client, keys, "sparse_ticker").keys(), 15, "a look")
    started = len(runs(log, "tick"))
    wait_until(lambda: len(runs(log, "tick")) > started, 15, "a tick of the every-4-s method")
    state = schedule(sync_client, keys, "sparse_ticker")
    assert runs(log, "nightly") == [] and runs(log, "yearly") == []
    assert "nightly:job" not in state and "yearly:job" not in state, state
    # The schedule moved past the missed ticks: they will not run later either.
    for method, cron in (("nightly", "0 3 * * *"), ("yearly", "0 0 1 1 *")):
        missed = int(croniter(cron, now).get_prev(float) * 1000)
        assert int(state[f"{method}:last"]) == missed, (method, state)
        assert int(state[f"{method}:next"]) == int(croniter(cron, now).get_next(float) * 1000)


@pytest.mark.timeout(90)
async def test_after_all_workers_were_down_an_every_schedule_runs_only_its_current_tick(
    workers: Workers, tmp_path: Path
) -> None:
    """The only worker is frozen (SIGSTOP) for more than two periods: its heartbeat lapses and no
    tick is queued meanwhile. It is thawed halfway between two ticks, so a made-up run of the tick
    that fell during the outage would start 2 s late, where the current tick's run starts on time."""
    log = tmp_path / "runs"
    period = 4.0
    proc = workers.start(SPARSE, *run_log_dep(log), *FAST_FAILOVER)
    workers.wait_registered("sparse_ticker", 1)
    wait_until(lambda: runs(log, "tick"), 15, "a first tick")
    proc.send_signal(signal.SIGSTOP)
    earliest = time.time() + 2 * period + 0.5
    thaw_at = (earliest // period + 1) * period + period / 2
    await anyio.sleep(thaw_at - time.time())  # the outage itself: nothing happens that could be awaited
    proc.send_signal(signal.SIGCONT)
    thawed = time.time()
    wait_until(lambda: len([at for at in runs(log, "tick") if at > thawed]) >= 2, 15,
               "two ticks after the outage")  # fmt: skip
    after = [at for at in runs(log, "tick") if at > thawed]
    lateness = [round(at % period, 3) for at in after]
    assert max(lateness) < 1.0, lateness  # each run is its tick's, on time


# -- a draining worker queues no ticks -----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_draining_worker_queues_no_more_ticks(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """SIGTERM lands just after a 5 s run started: the worker drains it for 5 s, across two ticks
    (every 2 s) that it must leave alone, since it will not run them."""
    log = tmp_path / "runs"
    proc = workers.start(PILING, *run_log_dep(log))
    workers.wait_registered("piling_ticker", 1)
    wait_until(lambda: runs(log, "start"), 15, "a run started")
    proc.send_signal(signal.SIGTERM)
    draining_since = int(time.time() * 1000)
    proc.wait(timeout=30)
    assert proc.returncode == 0, workers.output(proc)
    assert runs(log, "end"), "the run in flight finished during the drain"
    last = int(schedule(sync_client, keys, "piling_ticker")["long:last"])
    assert last <= draining_since - draining_since % 2000, (last, draining_since)
    assert sync_client.xlen(keys.calls("piling_ticker")) == 0  # nothing queued for nobody


# -- runs of overtaken ticks are not reclaimed after an outage ------------------------------------------


@pytest.mark.timeout(90)
async def test_after_an_outage_the_runs_of_overtaken_ticks_are_dropped_not_piled_up(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """Runs of 5 s every 2 s overlap: all three workers die with runs in flight, and one worker
    starts after more than two periods. The runs it reclaims are of ticks a later one has
    overtaken: they are acknowledged and their jobs cancelled, not run beside the current tick."""
    log = tmp_path / "runs"
    procs = [workers.start(PILING, *run_log_dep(log), *FAST_FAILOVER) for _ in range(3)]
    workers.wait_registered("piling_ticker", 3)
    wait_until(lambda: len(runs(log, "start")) - len(runs(log, "end")) >= 2, 20, "runs in flight")
    for proc in procs:
        workers.kill(proc)
    stream = keys.calls("piling_ticker")
    left = [p["message_id"] for p in sync_client.xpending_range(stream, GROUP, "-", "+", 100)]
    assert len(left) >= 2, left
    left_jobs = [sync_client.xrange(stream, i, i)[0][1][b"j"].decode() for i in left]
    await anyio.sleep(4.5)  # the outage, longer than two periods: nothing to await
    newcomer = workers.start(PILING, *run_log_dep(log), *FAST_FAILOVER)
    workers.wait_registered("piling_ticker", 1)

    def settled() -> bool:
        pending = {p["message_id"] for p in sync_client.xpending_range(stream, GROUP, "-", "+", 100)}
        return not pending & set(left)

    wait_until(settled, 15, "the runs the dead workers left are settled")
    assert len(runs(log, "start", newcomer.pid)) <= 1, runs(log, "start", newcomer.pid)
    states = [sync_client.hget(keys.job("piling_ticker", token), "status") for token in left_jobs]
    assert states == [b"cancelled"] * len(left), states  # none is left marked running


# -- a short delay is kept to, not rounded up to the next look at the delayed set -------------------


@pytest.mark.timeout(60)
async def test_a_delayed_call_with_a_tiny_delay_starts_close_to_its_due_time(
    pm: ProcessManager, tmp_path: Path
) -> None:
    """The workers look at the delayed set a few times a second; a call due sooner than their next
    look wakes one of them. Lateness is the job's start against its due time, both in Redis's
    clock; the median of nine keeps one hiccup of a busy machine from deciding."""
    await pm.spawn(TASKS, dependencies={"log": str(tmp_path / "runs")})
    late = []
    for _ in range(9):
        job = pm.job(await pm.client.submit("tasks", "add", (1, 2), {}, delay=0.0015))
        assert await job.result(timeout=10) == 3.0
        status = await job.status()
        assert status.started is not None and status.due is not None
        late.append((status.started - status.due).total_seconds())
    assert statistics.median(late) < 0.06, late


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
