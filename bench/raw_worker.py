"""The floor for this design: a hand-written XREADGROUP -> LPUSH worker with no framework.

Usage: python -m bench.raw_worker URL STREAM CONSUMER
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, cast

import anyio
import msgpack
import redis.asyncio as aioredis
from redis import exceptions as rexc


async def serve(url: str, stream: str, consumer: str) -> None:
    redis = aioredis.Redis.from_url(url)
    with contextlib.suppress(rexc.ResponseError):
        await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    while True:
        resp = cast(Any, await redis.xreadgroup("g", consumer, {stream: ">"}, count=64, block=1000))
        for _, entries in resp or []:
            async with redis.pipeline(transaction=False) as pipe:
                for entry_id, fields in entries:
                    a, b = msgpack.unpackb(fields[b"a"])
                    pipe.lpush(fields[b"r"], msgpack.packb(a + b))
                    pipe.xack(stream, "g", entry_id)
                    pipe.xdel(stream, entry_id)
                await pipe.execute()


if __name__ == "__main__":
    anyio.run(serve, sys.argv[1], sys.argv[2], sys.argv[3])
