"""Settlement: a failure around the method is answered at once, never a silent rerun; a reply that
cannot be written waits (a full Redis) or goes to the dead letters.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as sync_redis

from titan_broker import (
    BadArguments,
    CallTimeout,
    Client,
    InternalError,
    ProcessManager,
    RemoteError,
)
from titan_broker._wire.keys import Keys
from titan_broker.testing._local_redis import LocalRedis

from .conftest import SERVICES, Workers, in_thread, run_log_dep, wait_until
from .worker_harness import (
    EDGE,
    KIB,
    MEMORY_WORDS,
    explain,
    fill_redis,
    free_memory,
    log_records,
    pending_count,
    private_workers,
    runs,
    send,
)

pytestmark = pytest.mark.anyio


# --- a failure outside the method is an error reply at once, not a rerun ----------------------
async def test_unprintable_argument_is_an_error_reply_at_once_not_a_rerun(
    workers: Workers, pm: ProcessManager, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """A 5,000-digit int where a str belongs (Python refuses to repr ints over 4,300 digits, so a
    message quoting the argument fails): an error reply within seconds, never a run, no dead letter."""
    log = tmp_path / "runs.log"
    proc = workers.start(EDGE, *run_log_dep(log))  # default heartbeat TTL 5 s: 3 deliveries take 15 s+
    await in_thread(workers.wait_registered, "edge", 1)
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        try:
            await pm.client.call("edge", "text", (10**5000,), timeout=10)
        except CallTimeout as exc:
            pytest.fail(f"{exc}: {explain(proc, workers.output(proc))}")
    elapsed = time.monotonic() - started
    assert isinstance(info.value, (BadArguments, InternalError)), info.value
    assert elapsed < 5.0, elapsed
    assert len(str(info.value)) < 10 * KIB  # the argument is not quoted whole
    assert runs(log, "text") == []
    assert sync_client.xlen(keys.dead("edge")) == 0
    assert pending_count(sync_client, keys.calls("edge")) == 0
    assert await pm.client.call("edge", "text", ("abc",)) == 3


async def test_redis_error_in_bookkeeping_after_success_is_an_internal_error_not_a_rerun(
    workers: Workers, pm: ProcessManager, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """update() succeeds, then bumping get()'s cache generation fails (the key is a hash): the caller
    gets titan.InternalError at once, update() ran once, nothing is dead-lettered; get() still works
    (a failed cache lookup is a miss)."""
    log = tmp_path / "runs.log"
    proc = workers.start(EDGE, *run_log_dep(log))
    await in_thread(workers.wait_registered, "edge", 1)
    sync_client.hset(keys.cache_generation("edge", "get"), "not", "a counter")
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        try:
            await pm.client.call("edge", "update", ("a",), timeout=10)
        except CallTimeout as exc:
            pytest.fail(f"{exc}: {explain(proc, workers.output(proc))}")
    elapsed = time.monotonic() - started
    assert isinstance(info.value, InternalError), info.value
    assert info.value.type == "titan.InternalError"
    assert elapsed < 5.0, elapsed
    assert len(runs(log, "update a")) == 1
    assert sync_client.xlen(keys.dead("edge")) == 0
    assert pending_count(sync_client, keys.calls("edge")) == 0  # answered and acknowledged: no rerun
    error_id = info.value.details.get("error_id")
    assert error_id, info.value.details
    assert info.value.details["ran"] is True  # the caller knows its write happened
    await in_thread(wait_until, lambda: str(error_id).encode() in workers.output(proc), 10, "error id logged")
    assert await pm.client.call("edge", "get", ("a",), timeout=10) == "value of a"
    assert len(runs(log, "get a")) == 1
    assert len(runs(log, "update a")) == 1


@pytest.mark.slow
async def test_reply_held_by_a_full_redis_is_written_once_memory_is_back(
    namespace: str, tmp_path: Path
) -> None:
    """Redis fills up while the method runs, so its reply cannot be written: once memory is freed the
    caller gets the answer, the method ran once, and the worker said so a few times, not per retry."""
    log = tmp_path / "runs.log"
    with LocalRedis() as server, private_workers(server.url, namespace) as w:
        proc = w.start(EDGE, *run_log_dep(log))
        await in_thread(w.wait_registered, "edge", 1)
        admin = sync_redis.Redis.from_url(server.url)
        try:
            async with Client(server.url, namespace=namespace) as client, anyio.create_task_group() as tg:
                result: list[Any] = []

                async def call() -> None:
                    result.append(await client.call("edge", "nap", (1, 1.0), timeout=40))

                tg.start_soon(call)
                await in_thread(wait_until, lambda: runs(log, "nap 1"), 15, "the call running")
                await in_thread(fill_redis, admin)
                await in_thread(wait_until, lambda: runs(log, "napped 1"), 15, "the method done")
                await in_thread(
                    wait_until, lambda: MEMORY_WORDS.search(w.output(proc)), 15, "the worker noticing"
                )
                await anyio.sleep(4)  # Redis stays full a while: a retry loop would log each attempt
                free_memory(admin)
            assert result == [{"n": 1, "pid": proc.pid}]
            assert len(runs(log, "nap 1")) == 1
            assert pending_count(admin, Keys(namespace).calls("edge")) == 0
            mentions = [record for record in log_records(w.output(proc)) if MEMORY_WORDS.search(record)]
            assert 1 <= len(mentions) <= 4, b"\n".join(mentions[:10]).decode(errors="replace")[-5000:]
            assert proc.poll() is None
        finally:
            free_memory(admin)
            admin.close()


# --- failures that escape a middleware, and replies that cannot be written ------------------------
async def test_a_redis_error_in_a_middleware_is_an_internal_error_at_once(
    pm: ProcessManager, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    """The rate limit's bucket is clobbered (a string): the call is answered InternalError at once,
    by the execution's catch-all, and nothing stays pending to run again."""
    svc = await pm.spawn(SERVICES / "decorated.py")
    sync_client.set(keys.rate("decorated", "limited"), "not a bucket")
    started = time.monotonic()
    with pytest.raises(InternalError) as info:
        await svc.limited()
    assert time.monotonic() - started < 5.0
    assert info.value.details["error_id"]
    assert pending_count(sync_client, keys.calls("decorated")) == 0
    assert sync_client.xlen(keys.calls("decorated")) == 0


def test_a_reply_that_cannot_be_written_leaves_the_call_in_the_dead_letters(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """The reply key is not a stream: the answer cannot be written, so the entry is not acknowledged
    and lost but dead-lettered, saying why (the reply is written before the acknowledgement)."""
    log = tmp_path / "runs.log"
    workers.start(EDGE, *run_log_dep(log))
    workers.wait_registered("edge", 1)
    reply_key = keys.reply("edge", f"clobbered-{uuid.uuid4().hex[:8]}")
    sync_client.set(reply_key, "not a stream")
    send(sync_client, keys, "edge", "ping", reply_key=reply_key)
    [(_, dead)] = wait_until(lambda: sync_client.xrange(keys.dead("edge")), 15, "a dead letter")
    assert b"its reply could not be written" in dead[b"reason"]
    assert sync_client.xlen(keys.calls("edge")) == 0
    assert pending_count(sync_client, keys.calls("edge")) == 0
