"""Supervision: a spawned worker is restarted when killed; a worker whose manager died exits by itself."""

from __future__ import annotations

import sys

import anyio
import psutil
import pytest
import redis as sync_redis
from anyio.streams.buffered import BufferedByteReceiveStream

from titan_broker import (
    Client,
    ProcessManager,
    RestartPolicy,
)
from titan_broker._wire.keys import GROUP, Keys

from .conftest import POOLED, SERVICES, Recorder, in_thread, wait_until

pytestmark = pytest.mark.anyio


SLOW = SERVICES / "slow.py"


def in_flight(client: sync_redis.Redis, keys: Keys, service: str) -> int:
    """Calls of ``service`` delivered to a worker and not yet settled."""
    return int(client.xpending(keys.calls(service), GROUP)["pending"])


MANAGER = """
import sys, anyio
from titan_broker import ProcessManager

async def main(url, namespace, path):
    async with ProcessManager(url, namespace=namespace) as pm:
        await pm.spawn(path)
        print("ready", flush=True)
        await anyio.sleep_forever()

anyio.run(main, *sys.argv[1:])
"""


# -- "pm.spawn() is a supervised pool of one"
async def test_a_spawned_worker_is_restarted_when_it_is_killed(pm: ProcessManager) -> None:
    recorder = Recorder(pm)
    svc = await pm.spawn(POOLED, restart=RestartPolicy(backoff=0.1))
    [worker] = pm.workers
    assert await svc.sleep(0) == worker.pid
    worker.process.kill()  # SIGKILL, as the OOM killer would
    [crashed] = await recorder.wait_for("crashed")
    [restarted] = await recorder.wait_for("restarted")
    assert crashed.pid == worker.pid and restarted.pid != worker.pid
    [replacement] = pm.workers
    assert replacement.pid == restarted.pid
    assert await svc.sleep(0) == replacement.pid


async def test_a_worker_whose_manager_is_killed_finishes_its_call_then_exits(
    redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    manager = await anyio.open_process([sys.executable, "-c", MANAGER, redis_url, namespace, str(SLOW)],
                                       stderr=None)  # fmt: skip
    try:
        assert manager.stdout is not None
        with anyio.fail_after(30):
            assert await BufferedByteReceiveStream(manager.stdout).receive_until(b"\n", 1024) == b"ready"
        async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
            [wid] = [w.decode() for w in sync_client.smembers(keys.workers("slow"))]
            pid = int(sync_client.hget(keys.worker("slow", wid), "pid") or 0)
            answer: list[dict[str, int]] = []

            async def call() -> None:
                answer.append(await client.call("slow", "sleep", (5.0, 7), timeout=20))

            tg.start_soon(call)
            await in_thread(
                wait_until, lambda: in_flight(sync_client, keys, "slow") == 1, 10, "the call to run"
            )
            manager.kill()  # SIGKILL: the manager cannot stop its worker itself
            await manager.wait()

            def draining() -> bool:
                return sync_client.hget(keys.worker("slow", wid), "status") == b"draining"

            await in_thread(wait_until, draining, 5, "the orphan to start draining")
            assert answer == []  # it drains: the call in flight is still running
        assert answer == [{"pid": pid, "tag": 7}]  # answered by the orphan, not abandoned

        def gone() -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        await in_thread(wait_until, gone, 10, "the orphan to exit")
        assert not sync_client.exists(keys.worker("slow", wid))  # it deregistered on its way out
    finally:
        if manager.returncode is None:
            manager.kill()
        await manager.aclose()
