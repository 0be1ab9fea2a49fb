"""Request streams of their own for the caller users registered for a service (``<ns>:{<svc>}:users``):
workers read them beside the shared stream, and a call taken from one is settled, retried, dead-lettered
and replayed on the stream it came from."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import redis as sync_redis
import redis.asyncio as aioredis

from titan_broker import Client, WorkerOptions, process, public, retry
from titan_broker._registry import RegistryReader, queue_info
from titan_broker._registry.dead_letters import list_dead_letters, replay_dead_letters
from titan_broker._wire.keys import Keys
from titan_broker._wire.protocol import F_REPLY_VALUE, decode_reply, encode_request
from titan_broker.testing import LocalRedis, serve

from .conftest import FAST_FAILOVER, SERVICES, Workers, eventually, run_log_dep, titan

pytestmark = pytest.mark.anyio

SVC = "userstreamed"


@process(name=SVC, version="1.0.0")
class UserStreamed:
    failed: ClassVar[set[str]] = set()

    @public
    async def echo(self, tag: str) -> str:
        return tag

    @public
    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @public
    @retry(attempts=2, backoff=0.05, jitter=False)
    async def flaky(self, tag: str) -> str:
        if tag not in UserStreamed.failed:
            UserStreamed.failed.add(tag)
            raise ConnectionError("the first run fails")
        return f"again {tag}"


async def send(redis: aioredis.Redis, keys: Keys, stream: str, method: str, tag: str) -> Any:
    """A request written by hand on ``stream``; the value of its reply."""
    client_id = f"{Keys.stream_user(stream) or 't'}.{uuid.uuid4().hex[:16]}"  # a user's own, on its stream
    reply_key = keys.reply(SVC, client_id)
    fields = encode_request(f"{client_id}-1", method, (tag,), {}, reply_key, 10_000)
    await redis.xadd(stream, fields)  # type: ignore[arg-type]
    found = await redis.xread({reply_key: "0-0"}, count=1, block=10_000)
    assert found, f"no reply to {method}({tag!r}) sent on {stream}"
    reply = decode_reply(found[0][1][0][1][F_REPLY_VALUE])
    assert reply is not None and reply.ok, reply
    return reply.value


async def _at_least(letters: Any, count: int) -> Any:
    found = await letters
    return found if len(found) >= count else None


async def last_id(redis: aioredis.Redis, stream: str) -> bytes:
    return (await redis.xinfo_stream(stream))["last-generated-id"]  # type: ignore[no-any-return]


async def with_users(redis: aioredis.Redis, *users: str) -> tuple[str, Keys]:
    """A fresh namespace, and its keys, where ``users`` are registered for the service."""
    ns = f"us{uuid.uuid4().hex[:6]}"
    keys = Keys(ns)
    await redis.sadd(keys.users(SVC), *users)
    return ns, keys


async def test_a_worker_serves_retries_and_dead_letters_each_registered_users_calls_on_their_stream(
    private_redis: LocalRedis, aredis: aioredis.Redis
) -> None:
    ns, keys = await with_users(aredis, "alice", "bob")
    async with serve(UserStreamed, url=private_redis.url, namespace=ns):
        alice, bob = keys.user_calls(SVC, "alice"), keys.user_calls(SVC, "bob")
        assert await send(aredis, keys, alice, "echo", "from alice") == "from alice"
        assert await send(aredis, keys, bob, "echo", "from bob") == "from bob"
        assert await send(aredis, keys, keys.calls(SVC), "echo", "shared") == "shared"
        # @retry: the next run waits in the delayed set and comes due on bob's stream, not the shared one
        shared_before, bob_before = await last_id(aredis, keys.calls(SVC)), await last_id(aredis, bob)
        assert await send(aredis, keys, bob, "flaky", "b1") == "again b1"
        assert await last_id(aredis, keys.calls(SVC)) == shared_before
        bob_now = await last_id(aredis, bob)
        assert bob_now > bob_before
        assert await aredis.xlen(bob) == 0  # both runs settled there
        # a user registered while the worker runs: its stream is read within a heartbeat or two
        await aredis.sadd(keys.users(SVC), "carol")
        assert await send(aredis, keys, keys.user_calls(SVC, "carol"), "echo", "late") == "late"
        # a dead letter (a reply key outside the service's) keeps its user, and a replay goes back there
        bad = encode_request("t-dead", "echo", ("x",), {}, "elsewhere", 10_000)
        await aredis.xadd(alice, bad)  # type: ignore[arg-type]
        letters = await eventually(lambda: list_dead_letters(aredis, keys, SVC))
        assert [letter.user for letter in letters] == ["alice"]
        await aredis.delete(keys.dead(SVC))
        # a request on alice's stream is answered to alice's keys only: not to bob's reply stream
        hers, his = keys.reply(SVC, "alice.0123456789abcdef"), keys.reply(SVC, "bob.0123456789abcdef")
        for call_id, reply_to in (("bob.0123456789abcdef-1", hers), ("alice.0123456789abcdef-1", his)):
            forged = encode_request(call_id, "echo", ("forged",), {}, reply_to, 10_000)
            await aredis.xadd(alice, forged)  # type: ignore[arg-type]
        letters = await eventually(
            lambda: _at_least(list_dead_letters(aredis, keys, SVC), 2), what="both dead-lettered"
        )
        assert not await aredis.exists(his)  # not even the dead letter's answer
        await aredis.delete(keys.dead(SVC))
        await aredis.xadd(alice, bad)  # type: ignore[arg-type]
        letters = await eventually(lambda: list_dead_letters(aredis, keys, SVC))
        alice_before = await last_id(aredis, alice)
        assert await replay_dead_letters(aredis, keys, SVC) == 1
        assert await last_id(aredis, alice) > alice_before
        assert await last_id(aredis, keys.calls(SVC)) == shared_before
        await eventually(lambda: list_dead_letters(aredis, keys, SVC))  # dead again, from alice's stream
        assert [letter.user for letter in await list_dead_letters(aredis, keys, SVC)] == ["alice"]
        # titan queues counts the users' streams: a call waiting on carol's stream with no worker
    await aredis.xadd(keys.user_calls(SVC, "carol"), {"v": "3"})
    assert (await queue_info(aredis, keys, SVC)).backlog == 1
    overview = await RegistryReader(keys).read(aredis)  # the dashboard's, and the autoscaler's
    assert [s.queue.backlog for s in overview.services if s.info.name == SVC] == [1]


async def test_a_call_on_a_users_stream_held_by_a_killed_worker_is_run_by_another(
    redis_url: str, namespace: str, workers: Workers, tmp_path: Path
) -> None:
    keys, log = Keys(namespace), tmp_path / "runs.log"
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await redis.sadd(keys.users("client_log"), "alice")
        first = workers.start(SERVICES / "client_log.py", *run_log_dep(log), *FAST_FAILOVER)
        workers.wait_registered("client_log", 1)
        stream = keys.user_calls("client_log", "alice")
        await eventually(lambda: redis.exists(stream), what="alice's stream made by the worker")
        reply_key = keys.reply("client_log", "alice.0123456789abcdef")
        fields = encode_request("alice.0123456789abcdef-1", "run", ("held", 5.0), {}, reply_key, 30_000)
        await redis.xadd(stream, fields)  # type: ignore[arg-type]
        await eventually(lambda: anyio.to_thread.run_sync(lambda: log.exists() and "held" in log.read_text()))
        workers.kill(first)  # mid-call (it takes 5 s), before another worker can take it over
        workers.start(SERVICES / "client_log.py", *run_log_dep(log), *FAST_FAILOVER)
        found = None
        with anyio.fail_after(30):  # the TTL (1 s), then the call's 5 s again on the other worker
            while not found:
                found = await redis.xread({reply_key: "0-0"}, count=1, block=2_000)
        reply = decode_reply(found[0][1][0][1][F_REPLY_VALUE])
        assert reply is not None and reply.ok and reply.value == "held"
        assert log.read_text().split() == ["held", "held"]  # once each: the killed run, the reclaimed one
        assert await redis.xlen(stream) == 0
    finally:
        await redis.aclose()


async def test_a_dead_workers_own_stream_of_a_user_goes_back_to_that_users_stream(
    private_redis: LocalRedis, aredis: aioredis.Redis
) -> None:
    ns, keys = await with_users(aredis, "alice")
    await aredis.sadd(keys.affinity(SVC), "ghost")  # a worker that died with a call on its own stream
    reply_key = keys.reply(SVC, "alice.0123456789abcdef")
    fields = encode_request("alice.0123456789abcdef-1", "echo", ("rescued",), {}, reply_key, 30_000)
    await aredis.xadd(keys.user_worker_calls(SVC, "ghost", "alice"), fields)  # type: ignore[arg-type]
    options = WorkerOptions(heartbeat_interval=0.1, heartbeat_ttl=1.0)
    async with serve(UserStreamed, url=private_redis.url, namespace=ns, options=options):
        found = await aredis.xread({reply_key: "0-0"}, count=1, block=10_000)
        assert found, "the call on the dead worker's stream of alice was not moved and run"
        alice = keys.user_calls(SVC, "alice")
        assert await last_id(aredis, alice) != b"0-0"  # it went through alice's stream
        assert (await aredis.xinfo_stream(keys.calls(SVC)))["last-generated-id"] == b"0-0"
        assert not await aredis.exists(keys.user_worker_calls(SVC, "ghost", "alice"))
        # a dead worker's consumer on alice's stream (nothing pending, no record) is removed too
        await aredis.execute_command("XGROUP", "CREATECONSUMER", alice, "workers", "ghost")

        async def ghost_gone() -> bool:
            return all(c["name"] != b"ghost" for c in await aredis.xinfo_consumers(alice, "workers"))

        # (sweeps come every fifth reclaim: about every 5 s while the worker waits in 1 s reads)
        await eventually(ghost_gone, timeout=20, what="the dead consumer removed from alice's stream")


async def entries_added(redis: aioredis.Redis, stream: str) -> int:
    """How many entries a stream ever had (Redis 7 says; 6.2 does not)."""
    found = await redis.xinfo_stream(stream, full=True)
    if "entries-added" not in found:
        pytest.skip("Redis 6.2 does not count the entries a stream had")
    return int(found["entries-added"])


async def test_a_registered_callers_calls_go_to_its_own_streams_and_an_unregistered_ones_to_the_shared(
    private_redis: LocalRedis, aredis: aioredis.Redis
) -> None:
    ns, keys = await with_users(aredis, "alice")
    async with (
        serve(UserStreamed, url=private_redis.url, namespace=ns),
        Client(private_redis.url, namespace=ns, acl_user="alice") as alice,
        Client(private_redis.url, namespace=ns, acl_user="bob") as bob,
    ):
        svc = alice.proxy(SVC)
        assert await svc.echo("a") == "a"
        assert [i async for i in svc.count(5)] == list(range(5))
        assert await svc.with_options(key="k").echo("affine") == "affine"
        assert await alice.job(await alice.submit(SVC, "echo", ("job",))).result(timeout=10) == "job"
        assert (
            await alice.job(await alice.submit(SVC, "echo", ("later",), delay=0.2)).result(timeout=10)
            == "later"
        )
        later = alice.job(await alice.submit(SVC, "echo", ("never",), delay=60))
        assert await later.cancel() is True
        assert await bob.call(SVC, "echo", ("b",)) == "b"  # not registered: the shared stream
        ours = keys.user_calls(SVC, "alice")
        (worker,) = await aredis.smembers(keys.affinity(SVC))
        affine = keys.user_worker_calls(SVC, worker.decode(), "alice")
        assert await entries_added(aredis, ours) == 4  # a call, a stream, a job, the delayed job come due
        assert await entries_added(aredis, affine) == 1
        assert await entries_added(aredis, keys.calls(SVC)) == 1  # bob's


async def test_a_registered_callers_calls_spread_over_the_shards_on_its_own_stream_in_each(
    private_redis: LocalRedis, aredis: aioredis.Redis
) -> None:
    ns, keys = await with_users(aredis, "alice")
    async with (
        serve(UserStreamed, url=private_redis.url, namespace=ns, options=WorkerOptions(shards=2)) as svc,
        Client(private_redis.url, namespace=ns, acl_user="alice") as alice,
    ):
        for i in range(6):  # one each turn of the event loop: every shard gets some
            assert await alice.call(SVC, "echo", (str(i),)) == str(i)
        assert await entries_added(aredis, keys.user_calls(SVC, "alice")) >= 1
        assert await entries_added(aredis, keys.user_calls(f"{SVC}#1", "alice")) >= 1
        assert await entries_added(aredis, keys.calls(f"{SVC}#1")) == 0
        assert await svc.echo("served") == "served"  # the drain of serve() counts the users' streams


def test_titan_queues_purge_and_forget_cover_the_registered_users_streams(
    private_redis: LocalRedis, namespace: str
) -> None:
    keys, url = Keys(namespace), private_redis.url
    admin = sync_redis.Redis.from_url(url)
    try:
        admin.hset(keys.services, "nobody", '{"name": "nobody", "version": "1", "methods": []}')
        admin.sadd(keys.users("nobody"), "alice", "bob")
        admin.xadd(keys.user_calls("nobody", "alice"), {"v": "3", "id": "a-1"})
        admin.xadd(keys.user_calls("nobody", "bob"), {"v": "3", "id": "b-1"})
        admin.xadd(keys.calls("nobody"), {"v": "3", "id": "s-1"})
        done = titan(url, namespace, "queues", "--json")
        assert done.returncode == 0, done.stderr
        assert '"waiting": 3' in done.stdout, done.stdout
        done = titan(url, namespace, "purge", "nobody", "--yes", "--json")
        assert done.returncode == 0, done.stderr
        assert [admin.xlen(keys.user_calls("nobody", u)) for u in ("alice", "bob")] == [0, 0]
        admin.xadd(keys.user_calls("nobody", "alice"), {"v": "3", "id": "a-2"})
        done = titan(url, namespace, "forget", "nobody", "--yes")
        assert done.returncode == 0, done.stderr
        assert not admin.exists(keys.user_calls("nobody", "alice"))
    finally:
        admin.close()


@pytest.mark.parametrize("worker_id", ["w@alice", "w{x}", "w:1", "w 1", ""])
def test_a_worker_id_that_would_read_as_a_user_stream_or_break_a_key_is_refused(worker_id: str) -> None:
    from titan_worker import Worker

    from titan_broker import ConfigError
    from titan_broker._service.definition import describe

    with pytest.raises(ConfigError, match="worker id"):
        Worker(describe(UserStreamed), url="redis://127.0.0.1:1", namespace="ns", worker_id=worker_id)


def test_titan_acl_apply_registers_a_caller_and_a_workers_calls_with_the_services_they_call(
    private_redis: LocalRedis, namespace: str
) -> None:
    keys, url = Keys(namespace), private_redis.url
    for args in (
        ["caller", "a", "b", "--user", "web"],
        ["worker", "c", "--calls", "a", "--user", "c-worker"],
    ):
        done = titan(url, namespace, "acl", *args, "--apply")
        assert done.returncode == 0, done.stderr
    admin = sync_redis.Redis.from_url(url)
    try:
        assert [sorted(admin.smembers(keys.users(s))) for s in ("a", "b", "c")] == [
            [b"c-worker", b"web"],
            [b"web"],
            [],
        ]
        done = titan(
            url, namespace, "acl", "caller", "d", "--user", "printed"
        )  # printed only: nothing written
        assert done.returncode == 0 and "calls@printed" in done.stdout, done.stderr
        assert not admin.exists(keys.users("d"))
    finally:
        admin.close()
