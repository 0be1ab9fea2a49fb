"""Redis failing under callers and workers: stopped, restarted with or without its data, full."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
import redis as sync_redis
from redis import exceptions as rexc

from titan_broker import (
    CallLost,
    Client,
    RedisOutOfMemory,
    RedisUnavailable,
    TitanError,
)
from titan_broker._wire.keys import GROUP, Keys
from titan_broker.testing._local_redis import LocalRedis

from .conftest import (
    CALCULATOR,
    CHAOS,
    FAST_FAILOVER,
    SERVICES,
    Workers,
    eventually,
    in_thread,
    wait_until,
)
from .worker_harness import (
    EDGE,
    fill_redis,
    free_memory,
    pending,
    private_workers,
    replies,
    send,
)

pytestmark = pytest.mark.anyio


CLIENT_LOG = SERVICES / "client_log.py"


async def test_calls_fail_fast_while_redis_is_down_and_work_again_after(
    workers: Workers, aof_redis: LocalRedis, namespace: str
) -> None:
    workers.url = aof_redis.url
    workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    async with Client(aof_redis.url, namespace=namespace) as client:
        assert await client.call("calculator", "add", (1, 1)) == 2
        aof_redis.stop(kill=True)
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="Redis is unreachable"):
            await client.call("calculator", "add", (2, 2), timeout=5)
        assert time.monotonic() - started < 2
        aof_redis.start()
        result = None
        with anyio.fail_after(20):
            while result is None:
                try:
                    result = await client.call("calculator", "add", (3, 3), timeout=5)
                except RedisUnavailable:
                    await anyio.sleep(0.1)  # the client reconnects on its next command
        assert result == 6


async def test_calls_in_flight_complete_across_a_redis_restart(
    workers: Workers, aof_redis: LocalRedis, namespace: str, keys: Keys
) -> None:
    workers.url = aof_redis.url
    for _ in range(2):
        workers.start(CHAOS, "--heartbeat-ttl", "3")
    workers.wait_registered("chaos", 2)
    async with Client(aof_redis.url, namespace=namespace) as client:
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = (await client.call("chaos", "work", (i, 1500), timeout=30))[0]

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
            admin = sync_redis.Redis.from_url(aof_redis.url)

            def running() -> bool:
                return bool(admin.xpending(keys.calls("chaos"), GROUP)["pending"] == 20)

            await in_thread(wait_until, running, 10, "all twenty calls running")
            admin.close()
            aof_redis.stop(kill=True)
            await anyio.sleep(1.0)  # the outage
            aof_redis.start()
    assert results == {i: i * 2 for i in range(20)}


# --- a full Redis ----------------------------------------------------------------------------
async def test_new_call_on_a_full_redis_raises_redis_out_of_memory(namespace: str) -> None:
    with LocalRedis() as server, private_workers(server.url, namespace) as w:
        w.start(EDGE)
        await in_thread(w.wait_registered, "edge", 1)
        admin = sync_redis.Redis.from_url(server.url)
        try:
            async with Client(server.url, namespace=namespace) as client:
                assert isinstance(await client.call("edge", "ping", timeout=10), int)
                await in_thread(fill_redis, admin)
                try:
                    with pytest.raises(TitanError) as info:
                        await client.call("edge", "ping", timeout=10)
                    assert isinstance(info.value, RedisOutOfMemory), repr(info.value)
                    assert "out of memory" in str(info.value).lower(), str(info.value)
                finally:
                    free_memory(admin)
                assert isinstance(await client.call("edge", "ping", timeout=15), int)
        finally:
            admin.close()


async def test_a_redis_restart_that_lost_the_queue_fails_the_waiting_calls_at_once(
    private_redis: LocalRedis, namespace: str
) -> None:
    admin = sync_redis.Redis.from_url(private_redis.url)
    calls = Keys(namespace).calls("client_log")
    outcome: dict[str, object] = {}
    async with Client(private_redis.url, namespace=namespace) as client:

        async def waiting() -> None:
            try:
                await client.call("client_log", "run", ("queued",), timeout=30)
            except TitanError as exc:
                outcome["error"] = exc
                outcome["at"] = time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            await eventually(lambda: anyio.to_thread.run_sync(admin.xlen, calls), what="the request queued")
            private_redis.stop(kill=True)  # no AOF: the queue is gone
            restarted = time.monotonic()
            private_redis.start()

            async def failed() -> bool:
                return "error" in outcome

            await eventually(failed, 15, "the waiting call failed")
        took = float(outcome["at"]) - restarted  # type: ignore[arg-type]
        print(f"\nRedis restarted without its data: the waiting call got CallLost {took:.2f} s later")
        assert isinstance(outcome["error"], CallLost), repr(outcome["error"])
        assert "restarted" in str(outcome["error"])
        assert took < 10
        # The client carries on with the new server.
        workers = Workers(private_redis.url, namespace)
        try:
            workers.start(CLIENT_LOG)
            workers.wait_registered("client_log", 1)
            assert await client.call("client_log", "run", ("new",), timeout=10) == "new"
        finally:
            workers.close()
    admin.close()


# -- a full Redis ----------------------------------------------------------------------------------
async def test_a_full_redis_raises_redis_out_of_memory_naming_the_limit(namespace: str) -> None:
    with LocalRedis(extra_args=["--maxmemory-policy", "noeviction"]) as server:
        async with Client(server.url, namespace=namespace) as client:
            admin = sync_redis.Redis.from_url(server.url)
            for i in range(20):
                admin.set(f"{namespace}:fill:{i}", b"x" * 100_000)
            # A limit well below what it holds: every write is refused, however memory moves meanwhile.
            admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) - 1024 * 1024)
            limit = int(admin.config_get("maxmemory")["maxmemory"])
            with pytest.raises(rexc.OutOfMemoryError):
                admin.set(f"{namespace}:one-more", b"x")
            with pytest.raises(RedisOutOfMemory) as info:
                await client.call("client_log", "run", ("full",), timeout=2)
            message = str(info.value)
            print(f"\nfull Redis: {message}")
            assert "out of memory" in message and str(limit) in message
            assert isinstance(info.value, TitanError) and not isinstance(info.value, rexc.RedisError)
            with pytest.raises(RedisOutOfMemory):
                await client.invalidate_cache("client_log", "run")
                job = client.job(await client.submit("client_log", "run", ("job",)))
                assert await job.result(timeout=10) == "job"
                later = client.job(await client.submit("client_log", "run", ("later",), delay=60))
                assert await later.cancel() is True
            admin.close()


async def test_workers_and_callers_ride_out_scripts_flushed_over_and_over(
    private_redis: LocalRedis, namespace: str
) -> None:
    """SCRIPT FLUSH (or a failover to a node that never loaded them) between loading a script and
    running it: the script is loaded again, nothing crashes and every call is answered."""
    workers = Workers(private_redis.url, namespace)
    stop = threading.Event()

    def flush_forever() -> None:
        admin = sync_redis.Redis.from_url(private_redis.url)
        try:
            while not stop.is_set():
                admin.script_flush()
        finally:
            admin.close()

    try:
        procs = [workers.start(CALCULATOR, *FAST_FAILOVER) for _ in range(2)]
        workers.wait_registered("calculator", 2)
        flusher = threading.Thread(target=flush_forever, daemon=True)
        flusher.start()
        async with Client(private_redis.url, namespace=namespace) as client:
            with anyio.fail_after(60):
                for i in range(300):
                    assert await client.call("calculator", "add", (i, 1), timeout=10) == i + 1
        stop.set()
        flusher.join(5)
        assert all(p.poll() is None for p in procs), [workers.output(p)[-2000:] for p in procs]
    finally:
        stop.set()
        workers.close()


async def test_a_blocking_read_unblocked_by_a_failover_relocates_like_readonly() -> None:
    """A primary demoted mid-BLOCK answers UNBLOCKED ("the server is now a replica"): the channel
    must treat it like READONLY (WrongNode, a lost connection; relocate first), not as a bad command."""
    from titan_broker._redis.connection import Channel, WrongNode

    with LocalRedis() as primary, LocalRedis() as other:
        channel = await Channel.open(primary.url, "some-stream", socket_timeout=30)
        admin = sync_redis.Redis.from_url(primary.url)
        try:
            async with anyio.create_task_group() as tg:

                async def demote() -> None:
                    await eventually(lambda: in_thread(lambda: admin.info("clients")["blocked_clients"] >= 1))
                    await in_thread(admin.replicaof, "127.0.0.1", other.port)

                tg.start_soon(demote)
                with anyio.fail_after(10), pytest.raises(WrongNode, match="UNBLOCKED"):
                    await channel.execute("XREAD", "BLOCK", "8000", "STREAMS", "some-stream", "$")
        finally:
            await channel.aclose()
            admin.close()


def test_a_call_handed_twice_to_the_worker_running_it_is_answered_once(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    """A failover to a replica that had not received a delivery hands the entry out again, maybe to
    the worker already running it: both runs are cancelled at the same deadline and settle together,
    and the caller must still get one answer. Setting the group's last delivered id back does to
    the stream what such a failover does."""
    workers.start(SERVICES / "slow.py", "--concurrency", "4")
    workers.wait_registered("slow", 1)
    reply_key, entry_id = send(sync_client, keys, "slow", "sleep", (30,), deadline_in=3.0)
    wait_until(lambda: pending(sync_client, keys, "slow"), 10, "the worker to take the call")
    stream = keys.calls("slow")
    sync_client.xgroup_setid(stream, GROUP, "0")
    delivered = lambda: sync_client.xinfo_groups(stream)[0]["last-delivered-id"]  # noqa: E731
    wait_until(lambda: delivered() == entry_id, 10, "the call handed to the same worker again")
    wait_until(lambda: not pending(sync_client, keys, "slow"), 15, "the call settled")
    answers = replies(sync_client, reply_key)
    assert [a.ok for a in answers] == [False], answers
