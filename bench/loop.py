"""The floor bench_core measures titan-broker against: a batched, hand-written Redis-streams RPC loop.

What a careful engineer would write with no framework, batching at every step:

- callers queue their requests and one sender task writes everything queued in one pipeline
  (one XADD per call);
- one reply stream per caller process, drained by one dispatcher that takes everything available
  at once (XREAD COUNT 10000 BLOCK);
- workers XREADGROUP COUNT 64 BLOCK, run the batch, then settle it in one pipeline: one XADD per
  reply stream carrying all of its replies, one XACK and one XDEL for all the entries.

It promises much less than titan-broker: no deadlines, no ownership check when settling, no reclaim
of what a dead worker held, no backlog limit, errors not carried back. msgpack payloads, redis-py
asyncio with hiredis, as titan-broker uses.

Worker: python -m bench.loop URL STREAM CONSUMER
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import msgpack
import redis.asyncio as aioredis
from redis import exceptions as rexc

GROUP = "g"
REPLY_MAXLEN = 1000  # entries, each holding up to 64 replies: far more than a caller has in flight


async def create_group(redis: aioredis.Redis, stream: str) -> None:
    """The request stream and its consumer group (from the start, so no request is missed)."""
    with contextlib.suppress(rexc.ResponseError):  # BUSYGROUP: it exists already
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)


def ready_key(stream: str) -> str:
    """Where a worker says it is connected and about to read (a list of consumer names)."""
    return f"{stream}:ready"


class LoopClient:
    """The caller's side: ``await client.add(a, b)``; made by ``loop_client()``."""

    def __init__(self, redis: aioredis.Redis, stream: str) -> None:
        self._redis = redis
        self._stream = stream
        self.reply_stream = f"{stream}:reply:{uuid.uuid4().hex[:8]}"
        self._queue: list[tuple[int, bytes]] = []
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._wake = anyio.Event()
        self._next_id = 0

    async def add(self, a: int, b: int) -> int:
        self._next_id += 1
        call_id = self._next_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._queue.append((call_id, msgpack.packb([call_id, a, b])))
        self._wake.set()
        try:
            return cast(int, await future)
        finally:
            self._pending.pop(call_id, None)

    async def send(self) -> None:
        """Write everything queued since the last write in one pipeline."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            batch, self._queue = self._queue, []
            async with self._redis.pipeline(transaction=False) as pipe:
                for _, message in batch:
                    pipe.xadd(self._stream, {"r": self.reply_stream, "m": message})
                await pipe.execute()

    async def dispatch(self) -> None:
        """Take every reply available at once and resolve the callers' futures."""
        last = "0-0"
        while True:
            response = cast(Any, await self._redis.xread({self.reply_stream: last}, count=10_000, block=1000))
            for _, entries in response or []:
                for entry_id, fields in entries:
                    last = entry_id
                    for call_id, result in msgpack.unpackb(fields[b"b"]):
                        future = self._pending.get(call_id)
                        if future is not None and not future.done():
                            future.set_result(result)


@contextlib.asynccontextmanager
async def loop_client(url: str, stream: str) -> AsyncIterator[LoopClient]:
    """A caller process's client: its sender and dispatcher run until the block exits."""
    redis = aioredis.Redis.from_url(url, max_connections=4)
    try:
        await create_group(redis, stream)
        client = LoopClient(redis, stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send)
            tg.start_soon(client.dispatch)
            try:
                yield client
            finally:
                tg.cancel_scope.cancel()
        await redis.delete(client.reply_stream)
    finally:
        await redis.aclose()


async def add(a: int, b: int) -> int:
    """The service method: a coroutine, as a titan-broker method is."""
    return a + b


async def serve(url: str, stream: str, consumer: str) -> None:
    redis = aioredis.Redis.from_url(url)
    await create_group(redis, stream)
    await redis.rpush(ready_key(stream), consumer)
    while True:
        response = cast(Any, await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=64, block=1000))
        for _, entries in response or []:
            ids = []
            replies: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
            for entry_id, fields in entries:
                ids.append(entry_id)
                call_id, a, b = msgpack.unpackb(fields[b"m"])
                replies[fields[b"r"]].append((call_id, await add(a, b)))
            # Replies before the acknowledgement: a worker killed in between leaves the entries
            # pending (at least once), never acknowledged without an answer.
            async with redis.pipeline(transaction=False) as pipe:
                for reply_stream, items in replies.items():
                    pipe.xadd(
                        reply_stream, {"b": msgpack.packb(items)}, maxlen=REPLY_MAXLEN, approximate=True
                    )
                pipe.xack(stream, GROUP, *ids)
                pipe.xdel(stream, *ids)
                await pipe.execute()


if __name__ == "__main__":
    anyio.run(serve, sys.argv[1], sys.argv[2], sys.argv[3])
