"""Error replies: every error has an id that is in the worker's log; tracebacks stay there unless
exposed; what a caller is told when its call was given up or lost.
"""

from __future__ import annotations

import re

import anyio
import pytest

from titan_broker import (
    CallTimeout,
    ProcessManager,
    RemoteError,
)
from titan_broker._errors import TitanError
from titan_broker.testing._local_redis import LocalRedis

from .conftest import SERVICES, Workers, eventually, in_thread, titan, wait_until
from .worker_harness import (
    EDGE,
)

pytestmark = pytest.mark.anyio


PROMISED = SERVICES / "promised.py"


# --- tracebacks -------------------------------------------------------------------------------
async def test_error_reply_has_an_error_id_and_the_traceback_stays_in_the_worker_log(
    workers: Workers, pm: ProcessManager
) -> None:
    proc = workers.start(EDGE)  # default verbosity: what a production worker logs
    await in_thread(workers.wait_registered, "edge", 1)
    with pytest.raises(RemoteError) as info:
        await pm.client.call("edge", "fail", timeout=10)
    assert info.value.type == "ValueError"
    assert info.value.message == "edge failure on purpose"
    assert "traceback" not in info.value.details, info.value.details
    error_id = info.value.details.get("error_id")
    assert isinstance(error_id, str) and error_id, info.value.details
    await in_thread(wait_until, lambda: error_id.encode() in workers.output(proc), 10, "the error id logged")
    output = workers.output(proc)
    after_id = output[output.index(error_id.encode()) :][:5000]
    assert b"Traceback (most recent call last)" in after_id, output[-3000:]
    assert b"edge failure on purpose" in after_id
    assert await pm.client.call("edge", "ping") == proc.pid


async def test_expose_tracebacks_flag_sends_the_traceback_to_the_caller(
    workers: Workers, pm: ProcessManager
) -> None:
    workers.start(EDGE, "--expose-tracebacks")
    await in_thread(workers.wait_registered, "edge", 1)
    with pytest.raises(RemoteError) as info:
        await pm.client.call("edge", "fail", timeout=10)
    assert info.value.type == "ValueError"
    traceback = info.value.details.get("traceback")
    assert isinstance(traceback, str), info.value.details
    assert "edge failure on purpose" in traceback
    assert "fail" in traceback


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


async def test_a_call_redis_lost_is_not_said_to_be_taken_over(private_redis: LocalRedis) -> None:
    workers = Workers(private_redis.url, "lost")
    try:
        proc = workers.start(PROMISED)
        workers.wait_registered("promised", 1)
        async with ProcessManager(private_redis.url, namespace="lost") as pm:

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
                private_redis.stop(kill=True)
                private_redis.start()

                async def told() -> bool:
                    return b"Redis lost its data" in workers.output(proc)

                await eventually(told, 15, "the worker to tell why")
        assert b"taken over" not in workers.output(proc), workers.output(proc)
    finally:
        workers.close()
