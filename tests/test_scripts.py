"""The Lua scripts on their own, against a real Redis: the steps whose atomicity the guarantees rest on."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from titan_broker._redis.scripting import Script
from titan_broker._wire.keys import GROUP, Keys

pytestmark = pytest.mark.anyio
RECLAIM = Script("reclaim")
STARTED = Script("started")
TICK = Script("tick")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def read_one(redis: aioredis.Redis, stream: str, consumer: str) -> bytes:
    """Add an entry and have ``consumer`` read it (it is then pending, delivered once)."""
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    entry_id: bytes = await redis.xadd(stream, {"m": "x"})
    await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=1)
    return entry_id


async def deliveries(redis: aioredis.Redis, stream: str, entry_id: bytes) -> tuple[str, int]:
    [info] = await redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
    return info["consumer"].decode(), int(info["times_delivered"])


async def test_reclaim_never_takes_an_entry_its_own_worker_is_running(
    redis: aioredis.Redis, keys: Keys
) -> None:
    stream = keys.calls("scripts")
    entry_id = await read_one(redis, stream, "w1")
    # Idle past the 0 ms threshold, but w1 says it runs it (its renewal failed, say on a full Redis).
    _cursor, claimed, _counts = await RECLAIM(redis, [stream], [GROUP, "w1", 0, "-", 10, entry_id])
    assert claimed == []
    assert await deliveries(redis, stream, entry_id) == ("w1", 1)


async def test_reclaim_takes_an_idle_entry_and_counts_the_delivery(redis: aioredis.Redis, keys: Keys) -> None:
    stream = keys.calls("scripts")
    entry_id = await read_one(redis, stream, "dead")
    _cursor, claimed, counts = await RECLAIM(redis, [stream], [GROUP, "w2", 0, "-", 10])
    assert [e[0] for e in claimed] == [entry_id] and counts == [2]
    assert await deliveries(redis, stream, entry_id) == ("w2", 2)


async def test_reclaim_acknowledges_an_entry_deleted_while_pending(redis: aioredis.Redis, keys: Keys) -> None:
    stream = keys.calls("scripts")
    entry_id = await read_one(redis, stream, "dead")
    await redis.xdel(stream, entry_id)  # its caller gave up on it
    _cursor, claimed, _counts = await RECLAIM(redis, [stream], [GROUP, "w2", 0, "-", 10])
    assert claimed == []
    assert (await redis.xpending(stream, GROUP))["pending"] == 0


async def test_a_tick_is_queued_once_however_many_workers_ask_for_it(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Every worker asks for each tick; the first queues its run, the others find it queued."""
    seconds, _micro = await redis.time()
    tick = seconds * 1000 - 1000  # the tick of the second before, in Redis's clock
    token = f"periodic-{tick}-scripts"
    job = keys.job("scripts", token)
    script_keys = [keys.schedule("scripts"), keys.calls("scripts"), job, keys.jobs("scripts")]
    grace = 60_000  # a tick of the second before is current
    args = [
        "tick",
        tick,
        tick + 1000,
        f"scripts:{token}",
        60_000,
        keys.job_prefix("scripts"),
        grace,
        "m",
        "tick",
    ]
    assert await TICK(redis, script_keys, args) == 1
    # A worker took the run already (it no longer waits): a second ask for the tick is still refused.
    await redis.hset(job, "status", "running")
    assert await TICK(redis, script_keys, args) == 0
    assert await redis.xlen(keys.calls("scripts")) == 1


async def test_a_run_starting_marks_no_job_where_there_is_none(redis: aioredis.Redis, keys: Keys) -> None:
    """A run's start mark that lands on a Redis without the job (a worker that read the request
    from an old primary, back from a stop, and marks it on the new one, which never had the job)
    makes no job there: it would read as running for good, with nothing left to run or end it."""
    job = keys.job("scripts", "j-1")
    assert await STARTED(redis, [job], ["w1", 1000]) == b"unknown"
    assert not await redis.exists(job)
    await redis.hset(job, mapping={"status": "queued", "attempts": 0})
    assert await STARTED(redis, [job], ["w1", 1000]) == 1
    assert await redis.hget(job, "status") == b"running"
