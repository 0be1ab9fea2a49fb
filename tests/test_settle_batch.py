"""Settles sent together: finish.lua answers a batch of entries in one script call, each entry
under its own ownership check, its reply written before it is acknowledged."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc

from titan_broker._redis import AutoPipeline, Batch
from titan_broker._wire.keys import GROUP, Keys

pytestmark = pytest.mark.anyio
FINISH = Batch("finish")
SERVICE = "batch"
TTL_MS = 60_000


async def taken(aredis: aioredis.Redis, stream: str, consumer: str, n: int) -> list[bytes]:
    """``n`` entries added and read by ``consumer`` (pending for it)."""
    await aredis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [await aredis.xadd(stream, {"m": f"call-{i}"}) for i in range(n)]
    await aredis.xreadgroup(GROUP, consumer, {stream: ">"}, count=n)
    return ids


async def settled_together(pipe: AutoPipeline, parts: list[tuple[list[str], list[bytes]]]) -> list[object]:
    """Queue every part before the pipeline sends anything: they go as one script call."""
    futures = [FINISH.part(pipe, keys, args, (GROUP, "w1", TTL_MS)) for keys, args in parts]
    return await asyncio.gather(*futures, return_exceptions=True)


def script_calls(info: dict[str, dict[str, int]]) -> int:
    return info.get("cmdstat_evalsha", {}).get("calls", 0)


async def test_a_batch_settles_the_entries_it_owns_and_not_one_it_lost(
    aredis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    stream, reply = keys.calls(SERVICE), keys.reply(SERVICE, "client")
    ids = await taken(aredis, stream, "w1", 3)
    await aredis.xclaim(stream, GROUP, "w2", 0, [ids[1]])  # the second was taken over while w1 was away
    await FINISH.load(aredis)
    before = script_calls(await aredis.info("commandstats"))
    answers = await settled_together(
        pipe, [([stream, reply], [i, f"reply-{n}".encode()]) for n, i in enumerate(ids)]
    )
    assert answers == [1, 0, 1]
    assert script_calls(await aredis.info("commandstats")) - before == 1
    replies = [fields[b"reply"] for _, fields in await aredis.xrange(reply)]
    assert replies == [b"reply-0", b"reply-2"]
    assert await aredis.pttl(reply) > 0
    pending = await aredis.xpending_range(stream, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(ids[1], b"w2")]
    assert [entry_id for entry_id, _ in await aredis.xrange(stream)] == [ids[1]]  # the others deleted


async def test_an_entry_whose_reply_cannot_be_written_stays_pending_and_the_others_settle(
    aredis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    stream, reply, broken = keys.calls(SERVICE), keys.reply(SERVICE, "client"), keys.reply(SERVICE, "broken")
    await aredis.set(broken, "not a stream")
    ids = await taken(aredis, stream, "w1", 3)
    reply_keys = [reply, broken, reply]
    answers = await settled_together(
        pipe, [([stream, r], [i, b"ok"]) for i, r in zip(ids, reply_keys, strict=True)]
    )
    assert answers[0] == 1 and answers[2] == 1
    assert isinstance(answers[1], rexc.ResponseError) and "WRONGTYPE" in str(answers[1])
    # Not acknowledged without its reply: still this worker's, still in the stream.
    pending = await aredis.xpending_range(stream, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(ids[1], b"w1")]
    assert [entry_id for entry_id, _ in await aredis.xrange(stream)] == [ids[1]]
    assert await aredis.xlen(reply) == 2


async def test_an_entry_held_by_a_full_redis_stays_pending_until_memory_is_back(
    aredis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    stream, reply = keys.calls(SERVICE), keys.reply(SERVICE, "client")
    ids = await taken(aredis, stream, "w1", 2)
    await aredis.config_set("maxmemory", 1)  # every write that grows memory is refused
    try:
        answers = await settled_together(pipe, [([stream, reply], [i, b"ok"]) for i in ids])
    finally:
        await aredis.config_set("maxmemory", 0)
    assert all(isinstance(a, rexc.OutOfMemoryError) for a in answers), answers
    assert await aredis.xlen(reply) == 0
    pending = await aredis.xpending_range(stream, GROUP, min="-", max="+", count=10)
    assert [p["message_id"] for p in pending] == ids  # none acknowledged: tried again, answered once
    assert await settled_together(pipe, [([stream, reply], [i, b"ok"]) for i in ids]) == [1, 1]
    assert await aredis.xlen(reply) == 2
    assert await settled_together(pipe, [([stream, reply], [i, b"ok"]) for i in ids]) == [0, 0]
    assert await aredis.xlen(reply) == 2


async def test_a_batch_checks_the_ownership_of_entries_in_any_order_of_their_ids(
    aredis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    """Ids compare as numbers, not text: 5-10 comes after 5-9, and 12-0 after both."""
    stream, reply = keys.calls(SERVICE), keys.reply(SERVICE, "client")
    await aredis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [b"5-9", b"5-10", b"12-0", b"100-2"]
    for entry_id in ids:
        await aredis.xadd(stream, {"m": "x"}, id=entry_id)
    await aredis.xreadgroup(GROUP, "w1", {stream: ">"}, count=4)
    order = [ids[2], ids[0], ids[3], ids[1]]
    assert await settled_together(pipe, [([stream, reply], [i, b"ok"]) for i in order]) == [1, 1, 1, 1]
    assert await aredis.xlen(stream) == 0 and await aredis.xlen(reply) == 4


async def test_a_batch_sent_to_a_redis_that_forgot_its_scripts_is_loaded_and_sent_once_more(
    aredis: aioredis.Redis, pipe: AutoPipeline, keys: Keys
) -> None:
    stream, reply = keys.calls(SERVICE), keys.reply(SERVICE, "client")
    ids = await taken(aredis, stream, "w1", 2)
    await FINISH.load(aredis)
    await aredis.script_flush()  # a restart, or SCRIPT FLUSH
    assert await settled_together(pipe, [([stream, reply], [i, b"ok"]) for i in ids]) == [1, 1]
    assert await aredis.xlen(reply) == 2
