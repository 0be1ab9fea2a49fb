"""Submits sent together: submit_many.lua queues a batch of calls in one script call, each admitted
as submit.lua admits one (the backlog limit, the caller's deadline)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc

from titan_broker._redis import AutoPipeline, Batch
from titan_broker._wire.keys import GROUP, Keys

pytestmark = pytest.mark.anyio
SUBMIT = Batch("submit_many")
SERVICE = "batch"


async def submitted_together(pipe: AutoPipeline, keys: Keys, deadlines: list[int]) -> list[object]:
    """One call per deadline (Redis clock, ms; 0: none), queued before the pipeline sends anything."""
    stream, config = keys.calls(SERVICE), keys.config(SERVICE)
    futures = [
        SUBMIT.part(pipe, [stream], [config, "", 10_000, deadline, "id", f"call-{i}", "ttl", 30_000])
        for i, deadline in enumerate(deadlines)
    ]
    return await asyncio.gather(*futures, return_exceptions=True)


async def test_a_batch_over_the_backlog_limit_queues_what_fits_and_refuses_the_rest(
    aredis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    stream = keys.calls(SERVICE)
    await aredis.hset(keys.config(SERVICE), "max_backlog", 3)
    await aredis.xadd(stream, {"id": "waiting"})
    await SUBMIT.load(aredis)
    before = (await aredis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    answers = await submitted_together(pipe, keys, [0, 0, 0, 0])
    assert (await aredis.info("commandstats"))["cmdstat_evalsha"]["calls"] - before == 1
    assert all(isinstance(a, bytes) for a in answers[:2]), answers
    for refused in answers[2:]:
        assert isinstance(refused, rexc.ResponseError) and str(refused) == "TITANBACKLOG 3"
    queued = [fields[b"id"] for _, fields in await aredis.xrange(stream)]
    assert queued == [b"waiting", b"call-0", b"call-1"]


async def test_a_batch_counts_what_workers_took_out_of_the_backlog(
    aredis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    """Acknowledged entries are deleted: only what waits or runs counts, read when the batch runs."""
    stream = keys.calls(SERVICE)
    await aredis.hset(keys.config(SERVICE), "max_backlog", 2)
    assert all(isinstance(a, bytes) for a in await submitted_together(pipe, keys, [0, 0]))
    await aredis.xgroup_create(stream, GROUP, id="0")
    [[_, [(first, _fields), _]]] = await aredis.xreadgroup(GROUP, "w1", {stream: ">"}, count=2)
    await aredis.xack(stream, GROUP, first)
    await aredis.xdel(stream, first)
    answers = await submitted_together(pipe, keys, [0, 0])
    assert isinstance(answers[0], bytes) and isinstance(answers[1], rexc.ResponseError)


async def test_a_late_call_in_a_batch_is_refused_and_the_others_queued(
    aredis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    seconds, micros = await aredis.time()
    now_ms = seconds * 1000 + micros // 1000
    answers = await submitted_together(pipe, keys, [now_ms + 60_000, now_ms - 5_000, 0])
    assert isinstance(answers[0], bytes) and isinstance(answers[2], bytes)
    assert isinstance(answers[1], rexc.ResponseError) and str(answers[1]).startswith("TITANLATE")
    queued = await aredis.xrange(keys.calls(SERVICE))
    assert [fields[b"id"] for _, fields in queued] == [b"call-0", b"call-2"]
    assert int(queued[0][1][b"ttl"]) <= 60_000  # cut to what was left of its caller's wait
