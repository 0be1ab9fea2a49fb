"""A client's links to services (links.py) and the channels under them, at their edges.

What each test checks: a link that cannot open leaks nothing and ends its callers with a TitanError,
opening is bounded even against a Redis that accepts connections and never answers, and a client
that calls many service names keeps a bounded number of connections.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis as sync_redis

from titan_broker import Client, NoLiveWorkers, RedisUnavailable, TitanError
from titan_broker._calling.links import MAX_LINKS
from titan_broker._redis.connection import CONNECT_TIMEOUT, Channel
from titan_broker._redis.topology import discover
from titan_broker.testing._local_redis import LocalRedis

from .conftest import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def server() -> Iterator[LocalRedis]:
    with LocalRedis() as redis_server:
        yield redis_server


def freeze(server: LocalRedis, frozen: bool) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP if frozen else signal.SIGCONT)


async def test_opening_a_channel_to_a_redis_that_never_answers_is_bounded(server: LocalRedis) -> None:
    """The handshake has no socket timeout of its own (the watchdog only guards commands)."""
    topology = await discover(server.url)
    freeze(server, True)
    try:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="did not answer"):
            await Channel.open(topology)
        assert time.monotonic() - started < CONNECT_TIMEOUT + 2
    finally:
        freeze(server, False)


async def test_closing_a_client_while_a_link_opens_ends_its_callers_with_a_titan_error(
    server: LocalRedis,
) -> None:
    async with Client(server.url) as client:
        freeze(server, True)
        try:
            results: list[BaseException | None] = []

            async def first_call() -> None:
                try:
                    await client.call("never-called", "m", timeout=30)
                    results.append(None)
                except BaseException as exc:  # what the caller sees, CancelledError included
                    results.append(exc)

            tasks = [asyncio.create_task(first_call()) for _ in range(3)]
            await asyncio.sleep(0.3)  # they wait on the one opening
            await client.aclose()
            await asyncio.wait(tasks, timeout=CONNECT_TIMEOUT + 2)
        finally:
            freeze(server, False)
    assert len(results) == 3 and all(isinstance(r, TitanError) for r in results), results


async def test_a_link_that_fails_halfway_leaves_no_task_behind(server: LocalRedis) -> None:
    """A user refused TIME: the link's clock sync fails after its auto-pipeline started."""
    admin = sync_redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", "notime", "on", ">pw", "~*", "+@all", "-time")
    admin.close()
    url = server.url.replace("redis://", "redis://notime:pw@")
    async with Client(url) as client:
        before = len(asyncio.all_tasks())
        for i in range(5):
            with pytest.raises(RedisUnavailable, match="time"):
                await client.call(f"svc{i}", "m", timeout=2)
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) <= before


async def test_many_service_names_keep_the_connections_bounded(server: LocalRedis) -> None:
    admin = sync_redis.Redis.from_url(server.url)
    try:
        async with Client(server.url) as client:
            baseline = int(admin.info("clients")["connected_clients"])
            # Fail-fast calls to names nobody serves open no link at all.
            for i in range(20):
                with pytest.raises(NoLiveWorkers):
                    await client.call(f"ghost{i}", "m", timeout=2, wait_for_worker=False)
            assert int(admin.info("clients")["connected_clients"]) == baseline
            # Calls that wait open one link each, and the oldest idle ones close past MAX_LINKS.
            for i in range(MAX_LINKS + 10):
                with pytest.raises(TitanError):
                    await client.call(f"queued{i}", "m", timeout=0.05)
            assert len(list(client._connected())) <= MAX_LINKS

            async def server_side_bounded() -> bool:  # a link just closed: Redis sees its FIN soon after
                # Two per link, and a few in the pool: one call at a time has at most its probe for
                # live workers and its service's shard count, read in the background, in flight.
                return int(admin.info("clients")["connected_clients"]) <= baseline + 2 * MAX_LINKS + 4

            await eventually(server_side_bounded, 5, "Redis's count of connections within the bound")
    finally:
        admin.close()
