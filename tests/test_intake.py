"""The worker's intake: bounded input refused cheaply, malformed entries answered, poison calls and
max_deliveries sent to the dead letters instead of run again.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import anyio
import msgpack
import psutil
import pytest
import redis as sync_redis

from titan_broker import (
    Client,
    DeadLettered,
)
from titan_broker._wire.keys import Keys
from titan_broker._wire.protocol import F_REPLY_VALUE

from .conftest import (
    CHAOS,
    FAST_FAILOVER,
    Workers,
    in_thread,
    wait_until,
)
from .worker_harness import (
    EDGE,
    KIB,
    MIB,
    first_reply,
    log_records,
    peak_rss,
    pending_count,
    ping,
    replies,
    reset_peak_rss,
    send,
)

pytestmark = pytest.mark.anyio


async def test_poison_call_is_dead_lettered_and_its_caller_told(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    procs = [workers.start(CHAOS, *FAST_FAILOVER) for _ in range(3)]
    workers.wait_registered("chaos", 3)
    async with Client(redis_url, namespace=namespace) as client:
        started = time.monotonic()
        with pytest.raises(DeadLettered, match=r"delivered 3 times \(max_deliveries 2\)"):
            await client.call("chaos", "crash", timeout=30)
        assert time.monotonic() - started < 15
        assert sum(p.poll() is not None for p in procs) == 2  # two deliveries, two dead workers
        for p in procs:
            if p.poll() is not None:
                workers.killed.add(p.pid)
        assert await client.call("chaos", "work", (5,)) == [
            10,
            next(p.pid for p in procs if p.poll() is None),
        ]
    letters = sync_client.xrange(keys.dead("chaos"))
    assert len(letters) == 1
    assert letters[0][1][b"m"] == b"crash"
    assert sync_client.xlen(keys.calls("chaos")) == 0


# -- "Limits belong to the service ... @public(max_deliveries=1) for a call that must never run twice"
async def test_a_max_deliveries_1_call_is_dead_lettered_not_rerun_when_its_worker_dies(
    workers: Workers,
    redis_url: str,
    namespace: str,
    keys: Keys,
    sync_client: sync_redis.Redis,
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    procs = {p.pid: p for p in (workers.start(CHAOS, *FAST_FAILOVER) for _ in range(2))}
    workers.wait_registered("chaos", 2)
    async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
        outcome: list[BaseException | object] = []

        async def call() -> None:
            try:
                outcome.append(await client.call("chaos", "once", (str(runs), 3000), timeout=20))
            except DeadLettered as exc:
                outcome.append(exc)

        tg.start_soon(call)
        ran = await in_thread(wait_until, lambda: runs.exists() and runs.read_text(), 10, "the call to run")
        first = procs.pop(int(str(ran)))
        [second] = procs.values()  # the one that would run it again
        workers.kill(first)  # mid-call
    [result] = outcome
    assert isinstance(result, DeadLettered), result
    assert "delivered 2 times (max_deliveries 1)" in str(result)
    assert runs.read_text().splitlines() == [str(first.pid)]  # it ran once, on the worker that died
    [letter] = sync_client.xrange(keys.dead("chaos"))
    assert letter[1][b"m"] == b"once"
    assert second.poll() is None


# -- "--max-deliveries overrides the service's"
async def test_the_max_deliveries_flag_overrides_the_services_limit(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    # crash() says max_deliveries=2: two workers would die on it. The flag says 1: only one does.
    procs = [workers.start(CHAOS, *FAST_FAILOVER, "--max-deliveries", "1") for _ in range(2)]
    workers.wait_registered("chaos", 2)
    async with Client(redis_url, namespace=namespace) as client:
        with pytest.raises(DeadLettered, match=r"delivered 2 times \(max_deliveries 1\)"):
            await client.call("chaos", "crash", timeout=30)
    dead = [p for p in procs if p.poll() is not None]
    assert len(dead) == 1
    workers.killed.add(dead[0].pid)
    assert sync_client.hget(keys.config("chaos"), "max_deliveries") == b"1"


# --- unbounded input --------------------------------------------------------------------------
def test_entry_with_a_huge_unknown_field_is_refused_and_not_logged_whole(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    proc = workers.start(EDGE, "-v")
    workers.wait_registered("edge", 1)
    junk = b"j" * (4 * MIB)
    reply_key, _ = send(
        sync_client, keys, "edge", "echo", ("hi",), mutate=lambda f: f.update({b"junk": junk})
    )
    reply = first_reply(sync_client, reply_key)
    assert not reply.ok, f"a 4 MiB entry was served: {reply.value!r}"
    assert reply.error is not None
    assert reply.error["type"] in ("titan.BadRequest", "titan.PayloadTooLarge"), reply.error
    assert sum(len(f[F_REPLY_VALUE]) for _, f in sync_client.xrange(reply_key)) < 64 * KIB
    ping(sync_client, keys)
    assert len(workers.output(proc)) < 64 * KIB
    for _entry_id, fields in sync_client.xrange(keys.dead("edge")):
        assert sum(len(k) + len(v) for k, v in fields.items()) < 64 * KIB


def test_a_million_empty_maps_are_refused_without_a_memory_blowup(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    """1 MB of msgpack that decodes to a million dicts (~70 MB of Python objects): BadRequest, and the
    worker's peak RSS grows by less than 40 MB."""
    n = 1_000_000
    payload = b"\x92\xdd" + n.to_bytes(4, "big") + b"\x80" * n + b"\x80"  # [[{} * n], {}]
    proc = workers.start(EDGE, "--max-payload", str(2 * MIB))
    workers.wait_registered("edge", 1)
    ping(sync_client, keys)  # warm: the first call's imports and buffers are not the payload's
    process = psutil.Process(proc.pid)
    before = process.memory_info().rss
    reset = reset_peak_rss(proc.pid)
    reply_key, _ = send(sync_client, keys, "edge", "echo", (), mutate=lambda f: f.update({b"a": payload}))
    reply = first_reply(sync_client, reply_key, timeout=30)
    peak = peak_rss(proc.pid) if reset else process.memory_info().rss
    growth = peak - before
    assert growth < 40 * MIB, f"worker RSS grew by {growth / MIB:.0f} MB decoding the arguments"
    assert not reply.ok
    assert reply.error is not None
    assert reply.error["type"] == "titan.BadRequest", reply.error
    ping(sync_client, keys)


def test_unknown_msgpack_ext_type_is_a_bad_request_naming_it(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    workers.start(EDGE)
    workers.wait_registered("edge", 1)
    payload = msgpack.packb([[msgpack.ExtType(42, b"x")], {}], use_bin_type=True)
    reply_key, _ = send(sync_client, keys, "edge", "echo", (), mutate=lambda f: f.update({b"a": payload}))
    reply = first_reply(sync_client, reply_key)
    assert not reply.ok, f"an unknown ext type was served: {reply.value!r}"
    assert reply.error is not None
    assert reply.error["type"] == "titan.BadRequest", reply.error
    assert "42" in reply.error["message"], reply.error
    ping(sync_client, keys)


def test_a_flood_of_malformed_entries_is_logged_as_a_summary(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    """200 bad entries (100 without a reply key, 100 of an unknown version): far fewer than 200 log
    lines about them, each answerable one answered with BadRequest, and the worker serves on."""
    proc = workers.start(EDGE, "-v")
    workers.wait_registered("edge", 1)
    ping(sync_client, keys)
    before = workers.output(proc)
    bad_version_key = keys.reply("edge", f"edge-bad-{uuid.uuid4().hex[:8]}")
    for _ in range(100):
        send(sync_client, keys, "edge", "ping", mutate=lambda f: f.pop(b"r"))
        send(sync_client, keys, "edge", "ping", mutate=lambda f: f.update({b"v": b"9"}),
             reply_key=bad_version_key)  # fmt: skip
    calls = keys.calls("edge")
    wait_until(
        lambda: sync_client.xlen(calls) == 0 and pending_count(sync_client, calls) == 0, 30, "all settled"
    )
    answered = wait_until(lambda: len(replies(sync_client, bad_version_key)) >= 100 and replies(
        sync_client, bad_version_key), 15, "100 BadRequest replies")  # fmt: skip
    assert {r.error["type"] for r in answered if r.error} == {"titan.BadRequest"}
    ping(sync_client, keys)
    output = workers.output(proc)
    assert output.startswith(before)
    new_records = log_records(output[len(before) :])
    shown = "\n".join(r.decode(errors="replace")[:300] for r in new_records[:10])
    assert len(new_records) < 20, f"{len(new_records)} log records for 200 bad entries:\n{shown}"
    assert len(output[len(before) :].splitlines()) < 100, shown
    assert proc.poll() is None
