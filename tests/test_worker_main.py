"""titan-worker's command line: its options and exit codes."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest
import redis as sync_redis

from titan_broker._wire.keys import Keys
from titan_broker.testing import LocalRedis

from .conftest import (
    CALCULATOR,
    SERVICES,
    Workers,
    wait_until,
)

pytestmark = pytest.mark.anyio


def test_worker_exit_code_2_for_bad_options(workers: Workers) -> None:
    proc = workers.start(CALCULATOR, "--concurrency", "0")
    assert proc.wait(timeout=20) == 2
    assert b"concurrency must be at least 1" in workers.output(proc)


# -- the exit codes of titan-worker: 1 crashed, 5 init() raised
def test_worker_exits_5_when_init_raises(workers: Workers) -> None:
    proc = workers.start(SERVICES / "init_fails.py", "--dep", "dsn=sqlite://x")
    assert proc.wait(timeout=20) == 5
    out = workers.output(proc)
    assert b"init() raised RuntimeError: cannot open database 'sqlite://x'" in out
    assert b"init_fails.py" in out and b"Traceback" not in out


def test_worker_exits_1_when_it_crashes_on_an_unexpected_error(workers: Workers) -> None:
    with socket.socket() as taken:  # the metrics port is in use: nothing the worker could foresee
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        proc = workers.start(CALCULATOR, "--metrics-port", str(taken.getsockname()[1]))
        assert proc.wait(timeout=20) == 1
    out = workers.output(proc)
    assert b"titan-worker: crashed: OSError" in out, out


def test_worker_exits_4_when_it_loses_redis_while_starting(private_redis: LocalRedis) -> None:
    """Redis gone after the worker connected but before it registered: exit 4 (Redis unavailable), as
    when it is unreachable from the start, never 1 (a crash)."""
    workers = Workers(private_redis.url, "exit4")
    try:
        proc = workers.start(SERVICES / "redis_gone.py", "--dep", f"url={json.dumps(private_redis.url)}")
        assert proc.wait(timeout=30) == 4, workers.output(proc)
        out = workers.output(proc)
        assert b"127.0.0.1" in out and b"crashed" not in out, out
    finally:
        workers.close()


@pytest.mark.parametrize("where", ["import", "init"])
def test_worker_sigtermed_while_it_starts_exits_0_at_once(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path, where: str
) -> None:
    """SIGTERM while the service file imports or its init() runs (a slow start, a deploy rolled
    back at once): the worker has nothing to drain and exits 0 now, not killed by the signal nor
    after its start finished; it never serves."""
    mark = tmp_path / "mark"
    proc = workers.start(SERVICES / "slow_start.py", env={"SLOW_START": f"{where}:{mark}"})
    wait_until(mark.exists, 30, f"the worker in its {where}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, workers.output(proc)
    assert not sync_client.smembers(keys.workers("slow-start")), "the worker registered"
