"""@periodic schedules and delayed calls at their edges: missed ticks, schedules that cannot tick,
outages, draining workers, short delays.

Real Redis, real worker processes. Each run of a test service appends a line to a log file
(``<what> - <pid> <time>``), so a test can count runs and read when they started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from titan_broker import ConfigError, ProcessManager, periodic, process
from titan_broker.keys import Keys

from .conftest import SERVICES, Workers, wait_until

pytestmark = pytest.mark.anyio

BROKEN = SERVICES / "broken_schedule.py"
SPARSE = SERVICES / "sparse_ticker.py"
PILING = SERVICES / "piling_ticker.py"


def runs(log: Path, what: str, pid: int | None = None) -> list[float]:
    """When the runs logged as ``what`` (by ``pid``) started, in the order they were logged."""
    if not log.exists():
        return []
    lines = [line.split() for line in log.read_text().splitlines()]
    return [float(at) for name, _, by, at in lines if name == what and (pid is None or int(by) == pid)]


def dep(log: Path) -> tuple[str, str]:
    return "--dep", f"log={json.dumps(str(log))}"


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
    proc = workers.start(BROKEN, *dep(log))
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
