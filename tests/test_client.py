"""The client under failure: every call bounded by its timeout, a call given up is never run, proxies
and streams made early or left early, no live worker, ACL rules for callers and workers.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import anyio
import pytest
import redis as sync_redis
from redis import exceptions as rexc

from titan_broker import (
    CallTimeout,
    CircuitBreaker,
    Client,
    NoLiveWorkers,
    ProcessManager,
    RedisUnavailable,
    RemoteError,
    TitanError,
    with_options,
)
from titan_broker._calling.replies import READ_BLOCK_MS
from titan_broker._redis.connection import Channel
from titan_broker._wire import acl
from titan_broker._wire.keys import Keys
from titan_broker.testing._local_redis import LocalRedis

from .conftest import SERVICES, Workers, eventually, run_words

pytestmark = pytest.mark.anyio


CLIENT_LOG = SERVICES / "client_log.py"


def pid_of(server: LocalRedis) -> int:
    assert server.process is not None
    return server.process.pid


def caller_acl(ns: str, service: str = "client_log") -> list[str]:
    """``titan acl caller SERVICE --user caller``'s rule, as ACL SETUSER arguments (the user must be in
    the service's users set, as ``--apply`` puts it, to send with it)."""
    return acl.caller_rule(Keys(ns), (service,), "caller").arguments()


def worker_acl(ns: str, service: str = "client_log") -> list[str]:
    """``titan acl worker SERVICE --user worker``'s rule, as ACL SETUSER arguments."""
    return acl.worker_rule(Keys(ns), service, "worker").arguments()


# -- the whole call is bounded by its timeout ------------------------------------------------------
async def test_a_call_ends_at_its_timeout_when_redis_is_stopped_before_the_send(
    private_redis: LocalRedis, namespace: str
) -> None:
    admin = sync_redis.Redis.from_url(private_redis.url)
    async with Client(private_redis.url, namespace=namespace) as client:
        os.kill(pid_of(private_redis), signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises((CallTimeout, RedisUnavailable)) as info:
                await client.call("client_log", "run", ("late",), timeout=1)
            elapsed = time.monotonic() - started
        finally:
            os.kill(pid_of(private_redis), signal.SIGCONT)
        print(
            f"\ntimeout 1 s, Redis SIGSTOPped before the send: "
            f"{type(info.value).__name__} after {elapsed:.2f} s"
        )
        assert elapsed < 1.5, elapsed
        # The request sat in the socket and reached Redis after its caller gave up: refused, so it
        # can never run. (A PING answered means Redis has read everything sent before it.)
        assert admin.ping()
        assert admin.xlen(Keys(namespace).calls("client_log")) == 0
    admin.close()


async def test_a_call_ends_at_its_timeout_when_redis_is_stopped_after_the_send(
    private_redis: LocalRedis, namespace: str
) -> None:
    admin = sync_redis.Redis.from_url(private_redis.url)
    calls = Keys(namespace).calls("client_log")
    async with Client(private_redis.url, namespace=namespace) as client:
        outcome: dict[str, object] = {}

        async def caller() -> None:
            started = time.monotonic()
            try:
                await client.call("client_log", "run", ("stuck",), timeout=1)
            except TitanError as exc:
                outcome["error"] = exc
            outcome["elapsed"] = time.monotonic() - started

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller)
                await eventually(
                    lambda: anyio.to_thread.run_sync(admin.xlen, calls), what="the request queued"
                )
                os.kill(pid_of(private_redis), signal.SIGSTOP)
        finally:
            os.kill(pid_of(private_redis), signal.SIGCONT)
        print(
            f"\ntimeout 1 s, Redis SIGSTOPped after the send: {type(outcome['error']).__name__} "
            f"after {outcome['elapsed']:.2f} s"
        )
        assert isinstance(outcome["error"], CallTimeout)
        assert isinstance(outcome["elapsed"], float) and outcome["elapsed"] < 1.5
        # Once Redis is back, the request given up is deleted (in the background).
        await eventually(lambda: anyio.to_thread.run_sync(lambda: admin.xlen(calls) == 0), 10, "cleanup")
    admin.close()


async def test_every_connection_has_socket_timeouts_whatever_the_redis_py_version(redis_url: str) -> None:
    async with Client(redis_url) as client:
        pooled = client.redis.connection_pool.connection_kwargs
        assert pooled.get("socket_timeout") and pooled.get("socket_connect_timeout"), pooled
        bounds = []
        link = await client._link("any", anyio.current_time() + 5)  # a service's channels open on first use
        for channel in link.channels:
            conn = channel._client.connection
            assert conn is not None
            assert conn.socket_connect_timeout
            bounds.append(channel.stall_after)  # a watchdog bounds the hot path's replies
        # The dispatcher's connection BLOCKs in XREAD: its bound must exceed the BLOCK.
        assert min(bounds) > 0 and max(bounds) > READ_BLOCK_MS / 1000


async def test_a_channel_drops_a_reply_that_stalls_past_its_bound(namespace: str) -> None:
    """The watchdog (not redis-py's per-read socket timeout) ends a command Redis never answers."""
    with LocalRedis() as server:
        channel = await Channel.open(server.url, socket_timeout=0.5)
        try:
            assert await channel.execute("PING") == b"PONG"
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(rexc.TimeoutError, match=r"did not answer within 0\.5 s"):
                    with anyio.fail_after(3):  # without the watchdog the read would wait for ever
                        await channel.execute("PING")
                assert time.monotonic() - started < 2.0
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert await channel.execute("PING") == b"PONG"  # reconnects
        finally:
            await channel.aclose()


# -- a call given up is never run later ------------------------------------------------------------
async def test_a_call_its_caller_cancelled_is_never_run(
    pm: ProcessManager, workers: Workers, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    svc = await pm.connect("client_log")  # no worker yet: the requests wait in the stream
    with anyio.move_on_after(0.3):
        await svc.run("moved-on")
    async with anyio.create_task_group() as tg:
        tg.start_soon(svc.run, "task-cancelled")
        tg.start_soon(pm.client.call, "client_log", "run", ("client-cancelled",))
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    calls = pm.client.keys.calls("client_log")

    async def stream_empty() -> bool:
        return await pm.client.redis.xlen(calls) == 0

    await eventually(stream_empty, 5, "the requests given up deleted")
    workers.start(CLIENT_LOG, "--dep", f"log={log}")
    workers.wait_registered("client_log", 1)
    assert await svc.run("after") == "after"
    assert run_words(log) == ["after"]


# -- proxies and streams ---------------------------------------------------------------------------
async def test_a_proxy_made_before_any_worker_registered_can_await_and_iterate(
    pm: ProcessManager, workers: Workers
) -> None:
    svc = await pm.connect("client_log")  # nothing registered: it cannot know that count() streams
    workers.start(CLIENT_LOG)
    workers.wait_registered("client_log", 1)
    assert [i async for i in svc.count(3)] == [0, 1, 2]
    assert await svc.run("awaited") == "awaited"
    call = svc.count(2)
    assert [i async for i in call] == [0, 1]
    with pytest.raises(TypeError, match="already used"):
        [i async for i in call]
    with pytest.raises(TitanError, match="does not stream: await it"):
        [i async for i in svc.run("iterated")]
    with pytest.raises(TitanError, match="iterate it with 'async for'"):
        await svc.count(2)


async def test_a_half_open_probe_left_with_break_does_not_keep_the_circuit_open(
    pm: ProcessManager, workers: Workers
) -> None:
    workers.start(CLIENT_LOG)
    workers.wait_registered("client_log", 1)
    svc = await pm.connect("client_log", breaker=CircuitBreaker(failures=1, reset_after=0.2))

    async def half_open() -> bool:
        return bool(svc.circuit == "half-open")

    with pytest.raises(RemoteError):
        await svc.boom()
    assert svc.circuit == "open"
    await eventually(half_open, what="half-open")
    async for _ in svc.count(100):  # the probe: items came, so the service answers
        break

    async def closed() -> bool:
        return bool(svc.circuit == "closed")

    await eventually(closed, 5, "the circuit closed by the abandoned probe")
    assert await svc.run("after") == "after"
    # A probe cancelled before any item says nothing either way: the next call probes again.
    with pytest.raises(RemoteError):
        await svc.boom()
    await eventually(half_open, what="half-open again")
    with anyio.move_on_after(0.3):
        async for _ in svc.count(3, 5.0):
            pass
    await eventually(half_open, 5, "the probe released")
    assert await svc.run("probe") == "probe"
    assert svc.circuit == "closed"


async def test_a_caller_that_breaks_out_of_a_stream_and_leaves_leaves_nothing_without_a_ttl(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    workers.start(CLIENT_LOG)
    workers.wait_registered("client_log", 1)
    keys = Keys(namespace)
    async with Client(redis_url, namespace=namespace) as client:
        async for _ in client.proxy("client_log").count(1000, 0.001):
            break
    admin = sync_redis.Redis.from_url(redis_url)
    try:
        # The worker stops the producer and settles the call; then nothing it or we wrote lasts for ever.
        wait_until_settled = lambda: admin.xlen(keys.calls("client_log")) == 0  # noqa: E731
        await eventually(lambda: anyio.to_thread.run_sync(wait_until_settled), 10, "the stream settled")
        found = admin.keys(f"{namespace}:{{*}}:reply:*") + admin.keys(f"{namespace}:{{client_log}}:stream:*")
        assert all(admin.pttl(k) > 0 for k in found), {k: admin.pttl(k) for k in found}
    finally:
        admin.close()


# -- no worker at all; a Redis restart that loses the queue ----------------------------------------
async def test_wait_for_worker_false_fails_at_once_without_a_live_worker(
    pm: ProcessManager, workers: Workers
) -> None:
    svc = with_options(await pm.connect("client_log"), wait_for_worker=False)
    started = time.monotonic()
    with pytest.raises(NoLiveWorkers, match="no live worker"):
        await svc.run("nobody")
    elapsed = time.monotonic() - started
    print(f"\nwait_for_worker=False, no worker (timeout 15 s): NoLiveWorkers after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    assert await pm.client.redis.xlen(pm.client.keys.calls("client_log")) == 0  # nothing was queued
    workers.start(CLIENT_LOG)
    workers.wait_registered("client_log", 1)
    assert await svc.run("somebody") == "somebody"


async def test_acl_rules_let_a_caller_call_but_not_reconfigure_a_service(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="titan_broker")
    with LocalRedis(extra_args=["--requirepass", "adminpass"]) as server:
        admin = sync_redis.Redis(port=server.port, password="adminpass")
        admin.sadd(Keys(namespace).users("client_log"), "caller")  # registered, as --apply does
        admin.execute_command("ACL", "SETUSER", "caller", ">callerpass", *caller_acl(namespace))
        admin.execute_command("ACL", "SETUSER", "worker", ">workerpass", *worker_acl(namespace))
        base = f"127.0.0.1:{server.port}/0"
        workers = Workers(f"redis://worker:workerpass@{base}", namespace)
        keys = Keys(namespace)
        try:
            worker = workers.start(CLIENT_LOG)
            workers.wait_registered("client_log", 1)
            async with Client(f"redis://caller:callerpass@{base}", namespace=namespace) as client:
                svc = client.proxy("client_log")
                assert await svc.run("a") == "a"
                assert [i async for i in svc.count(40)] == list(range(40))  # credit granted on the way
                async for _ in svc.count(1000, 0.001):
                    break  # a stream left early: its control hash says cancel
                with pytest.raises(CallTimeout):
                    await svc.with_options(timeout=0.3).run("slow", 3.0)  # its request deleted after
                assert await svc.with_options(wait_for_worker=False, key="k").run("b") == "b"
                await client.invalidate_cache("client_log", "run")
                job = client.job(await client.submit("client_log", "run", ("job",)))
                assert await job.result(timeout=10) == "job"
                later = client.job(await client.submit("client_log", "run", ("later",), delay=60))
                assert await later.cancel() is True
                assert await client.streaming_methods("client_log") == frozenset({"count"})
                with pytest.raises(rexc.NoPermissionError):
                    await client.redis.hset(keys.config("client_log"), "max_backlog", 1)
                with pytest.raises(rexc.NoPermissionError):
                    await client.redis.execute_command(
                        "XGROUP", "DESTROY", keys.calls("client_log"), "workers"
                    )
                with pytest.raises(rexc.NoPermissionError):
                    await client.redis.hset(keys.services, "client_log", "{}")
                with pytest.raises(rexc.NoPermissionError):
                    await client.redis.get("outside-the-namespace")
                calls, other_reply = keys.calls("client_log"), keys.reply("client_log", "someone-else")
                for command in (
                    ("DEL", calls),  # would destroy the group with the stream
                    ("SET", calls, "x"),
                    ("SET", keys.cache_generation("client_log", "run"), 0),
                    ("XADD", other_reply, "*", "reply", "forged"),  # no forged replies
                    ("HSET", keys.worker("client_log", "w1"), "status", "ready"),
                ):
                    with pytest.raises(rexc.NoPermissionError):
                        await client.redis.execute_command(*command)
            worker_user = sync_redis.Redis(port=server.port, username="worker", password="workerpass")
            with pytest.raises(rexc.NoPermissionError):
                worker_user.execute_command("XGROUP", "DESTROY", keys.calls("client_log"), "workers")
            worker_user.close()
            assert admin.hget(keys.config("client_log"), "max_backlog") != b"1"
            assert admin.xinfo_groups(keys.calls("client_log"))  # the group is still there
            assert b"no permissions" not in workers.output(worker)  # the worker's rule lets it work
        finally:
            workers.close()
            admin.close()
    # Nothing the client did was refused (INFO, the canary, cleanup...): it logged no warning at all.
    assert [r.getMessage() for r in caplog.records if r.name.startswith("titan_broker")] == []
