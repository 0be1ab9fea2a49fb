"""Submits sent together: submit_many.lua queues a batch of calls in one script call, each admitted
as submit.lua admits one (the backlog limit, the caller's deadline)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc

from titan_broker._redis import AutoPipeline, Batch, Channel
from titan_broker._wire.keys import GROUP, Keys
from titan_broker.testing import LocalRedis

pytestmark = pytest.mark.anyio
SUBMIT = Batch("submit_many")
SERVICE = "batch"


@pytest.fixture
async def redis(private_redis: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def pipe(private_redis: LocalRedis, keys: Keys) -> AsyncIterator[AutoPipeline]:
    pipeline = AutoPipeline(await Channel.open(private_redis.url, keys.calls(SERVICE)))
    yield pipeline
    await pipeline.aclose()
    await pipeline._channel.aclose()


async def submitted_together(pipe: AutoPipeline, keys: Keys, deadlines: list[int]) -> list[object]:
    """One call per deadline (Redis clock, ms; 0: none), queued before the pipeline sends anything."""
    stream, config = keys.calls(SERVICE), keys.config(SERVICE)
    futures = [
        SUBMIT.part(pipe, [stream], [config, "", 10_000, deadline, "id", f"call-{i}", "ttl", 30_000])
        for i, deadline in enumerate(deadlines)
    ]
    return await asyncio.gather(*futures, return_exceptions=True)


async def test_a_batch_over_the_backlog_limit_queues_what_fits_and_refuses_the_rest(
    redis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    stream = keys.calls(SERVICE)
    await redis.hset(keys.config(SERVICE), "max_backlog", 3)
    await redis.xadd(stream, {"id": "waiting"})
    await SUBMIT.load(redis)
    before = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    answers = await submitted_together(pipe, keys, [0, 0, 0, 0])
    assert (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"] - before == 1
    assert all(isinstance(a, bytes) for a in answers[:2]), answers
    for refused in answers[2:]:
        assert isinstance(refused, rexc.ResponseError) and str(refused) == "TITANBACKLOG 3"
    queued = [fields[b"id"] for _, fields in await redis.xrange(stream)]
    assert queued == [b"waiting", b"call-0", b"call-1"]


async def test_a_batch_counts_what_workers_took_out_of_the_backlog(
    redis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    """Acknowledged entries are deleted: only what waits or runs counts, read when the batch runs."""
    stream = keys.calls(SERVICE)
    await redis.hset(keys.config(SERVICE), "max_backlog", 2)
    assert all(isinstance(a, bytes) for a in await submitted_together(pipe, keys, [0, 0]))
    await redis.xgroup_create(stream, GROUP, id="0")
    [[_, [(first, _fields), _]]] = await redis.xreadgroup(GROUP, "w1", {stream: ">"}, count=2)
    await redis.xack(stream, GROUP, first)
    await redis.xdel(stream, first)
    answers = await submitted_together(pipe, keys, [0, 0])
    assert isinstance(answers[0], bytes) and isinstance(answers[1], rexc.ResponseError)


async def test_a_late_call_in_a_batch_is_refused_and_the_others_queued(
    redis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    answers = await submitted_together(pipe, keys, [now_ms + 60_000, now_ms - 5_000, 0])
    assert isinstance(answers[0], bytes) and isinstance(answers[2], bytes)
    assert isinstance(answers[1], rexc.ResponseError) and str(answers[1]).startswith("TITANLATE")
    queued = await redis.xrange(keys.calls(SERVICE))
    assert [fields[b"id"] for _, fields in queued] == [b"call-0", b"call-2"]
    assert int(queued[0][1][b"ttl"]) <= 60_000  # cut to what was left of its caller's wait
