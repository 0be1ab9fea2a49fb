"""Deadlines are in Redis's clock: a worker whose host clock is off neither drops fresh calls nor
runs stale ones. The worker's clock is shifted with libfaketime (LD_PRELOAD), a real process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis as sync_redis

from titan_broker._wire.keys import Keys

from .conftest import Workers, run_log_dep, wait_until
from .worker_harness import EDGE, first_reply, runs, send

LIBFAKETIME = next(
    (p for p in Path("/usr/lib").glob("*/faketime/libfaketime.so.1")),
    Path("/usr/lib/faketime/libfaketime.so.1"),
)

pytestmark = pytest.mark.skipif(
    not LIBFAKETIME.exists(), reason="libfaketime is not installed (apt-get install faketime; .ci/run does)"
)


def skewed(seconds: int) -> dict[str, str]:
    """The environment of a process whose clock is ``seconds`` off (monotonic time is left alone)."""
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": f"{seconds:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


def test_worker_whose_clock_runs_ahead_still_serves_fresh_calls(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    workers.start(EDGE, *run_log_dep(log), env=skewed(+120))
    workers.wait_registered("edge", 1)
    reply_key, _ = send(sync_client, keys, "edge", "nap", (1, 0.0), deadline_in=10.0)
    reply = first_reply(sync_client, reply_key)
    assert reply.ok, reply.error  # with the worker's own clock the deadline passed 110 s ago
    assert len(runs(log, "nap 1")) == 1


def test_worker_whose_clock_runs_behind_drops_calls_whose_deadline_passed(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    # Queued with 0.5 s to live while no worker runs; by its own clock the worker would still
    # have two minutes to run it.
    reply_key, entry_id = send(sync_client, keys, "edge", "nap", (2, 0.0), deadline_in=0.5)
    queued_ms = int(entry_id.split(b"-")[0])
    wait_until(lambda: _redis_ms(sync_client) > queued_ms + 600, 5, "the deadline to pass")
    workers.start(EDGE, *run_log_dep(log), env=skewed(-120))
    workers.wait_registered("edge", 1)
    reply = first_reply(sync_client, reply_key)
    assert reply.error is not None and reply.error["type"] == "titan.DeadlineExceeded", reply
    assert "dropped unrun" in reply.error["message"]
    assert runs(log, "nap 2") == []


def _redis_ms(client: sync_redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds * 1000 + micros / 1000)


def test_faketime_really_shifts_a_worker_clock() -> None:
    """The premise of the tests above: the shifted process sees another time than this one."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env={**skewed(+120)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(out.stdout) - time.time() > 100


def test_a_worker_whose_clock_jumps_while_it_runs_still_serves_fresh_calls(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """The host clock jumping two minutes ahead (NTP stepping it, a VM resumed) after the worker
    measured Redis's clock must not make fresh calls look expired until the next measurement."""
    log = tmp_path / "runs.log"
    offset = tmp_path / "faketime"
    offset.write_text("+0s\n")
    # Beats far apart: no measurement between the jump and the call corrects the offset.
    workers.start(EDGE, *run_log_dep(log), "--heartbeat-ttl", "60", "--heartbeat-interval", "20",
                  env=jumping(offset))  # fmt: skip
    workers.wait_registered("edge", 1)
    reply_key, _ = send(sync_client, keys, "edge", "nap", (1, 0.0), deadline_in=10.0)
    assert first_reply(sync_client, reply_key).ok  # served before the jump
    offset.write_text("+120s\n")
    reply_key, _ = send(sync_client, keys, "edge", "nap", (2, 0.0), deadline_in=10.0)
    reply = first_reply(sync_client, reply_key)
    assert reply.ok, reply.error  # by the jumped clock, its deadline passed 110 s ago
    assert len(runs(log, "nap 2")) == 1


def jumping(offset: Path) -> dict[str, str]:
    """The environment of a process whose clock is as far off as the file ``offset`` says, read
    again at every call (write it to jump the clock; monotonic time is left alone)."""
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }
