"""AutoPipeline: concurrent commands on one connection, batched, each with its own result."""

from __future__ import annotations

import anyio
import pytest
from redis import exceptions as rexc

from titan_broker.connection import AutoPipeline, Channel, open_redis

pytestmark = pytest.mark.anyio


async def test_concurrent_commands_are_batched_and_keep_their_own_results(
    redis_url: str, namespace: str
) -> None:
    redis = await open_redis(redis_url)
    channel = await Channel.open(redis_url)
    try:
        pipe = AutoPipeline(channel)
        await redis.set(f"{namespace}:str", "x")
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            try:
                key = f"{namespace}:str" if i == 13 else f"{namespace}:n"
                results[i] = await pipe.execute("INCR", key)
            except rexc.ResponseError as exc:
                results[i] = exc

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
        assert isinstance(results.pop(13), rexc.ResponseError)
        assert sorted(results.values()) == list(range(1, 100))  # type: ignore[type-var]
        assert await redis.get(f"{namespace}:n") == b"99"
    finally:
        await channel.aclose()
        await redis.aclose()
