"""AutoPipeline: concurrent commands on one connection, batched, each with its own result."""

from __future__ import annotations

import anyio
import pytest
import redis as sync_redis
from redis import exceptions as rexc

from titan_broker._redis.connection import AutoPipeline, Channel, open_redis
from titan_broker.testing._local_redis import LocalRedis

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


async def test_commands_issued_at_the_same_moment_go_out_in_one_write(namespace: str) -> None:
    """Counted on the server: Redis's ``total_reads_processed`` counts the reads of its sockets."""
    with LocalRedis() as server:  # a Redis of its own: no other client adds reads
        admin = sync_redis.Redis.from_url(server.url)
        channel = await Channel.open(server.url)
        try:
            pipe = AutoPipeline(channel)

            def reads() -> int:
                return int(admin.info("stats")["total_reads_processed"])  # this INFO is one read too

            before = reads()
            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(pipe.execute, "INCR", f"{namespace}:n")
            together = reads() - before - 1
            before = reads()
            for _ in range(100):
                await pipe.execute("INCR", f"{namespace}:n")
            one_by_one = reads() - before - 1
            assert admin.get(f"{namespace}:n") == b"200"
        finally:
            await channel.aclose()
            admin.close()
    print(f"\n100 INCRs: {together} socket reads issued together, {one_by_one} issued one by one")
    assert one_by_one >= 100  # the counter does see every write
    # The first goes alone (nothing was in flight); the 99 issued meanwhile follow in one write.
    assert together <= 3, together
