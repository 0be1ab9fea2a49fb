"""Replies: the caller's reply dispatcher ignores junk and survives a clobbered key; reply streams are
trimmed by their reader and expire.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from titan_broker import (
    CallLost,
    ProcessManager,
    TitanError,
    WorkerOptions,
)

from .conftest import (
    CALCULATOR,
    SERVICES,
    Workers,
    eventually,
    run_words,
)

pytestmark = pytest.mark.anyio


SLOW = SERVICES / "slow.py"


CLIENT_LOG = SERVICES / "client_log.py"


async def test_duplicate_and_garbage_replies_are_ignored(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR)
    assert await calc.add(1, 1) == 2
    client = pm.client
    reply_key = client.keys.reply("calculator", client.client_id)
    from titan_broker._wire.protocol import encode_ok

    await client.redis.xadd(reply_key, {b"reply": encode_ok(f"{client.client_id}-1", 999, "forged")})
    await client.redis.xadd(reply_key, {b"reply": b"\x00garbage"})
    assert await calc.add(2, 2) == 4


# -- "reply streams are trimmed by their reader and expire"
async def test_reply_stream_is_trimmed_by_its_reader_and_expires(pm: ProcessManager) -> None:
    slow = await pm.spawn(SLOW, options=WorkerOptions(reply_ttl=1.0))
    redis, reply_key = pm.client.redis, pm.client.keys.reply("slow", pm.client.client_id)
    for i in range(20):
        assert await slow.echo(i) == i
    assert 0 < await redis.pttl(reply_key) <= 1000

    async def trimmed() -> bool:
        return not await redis.exists(reply_key) or await redis.xlen(reply_key) == 0

    await eventually(trimmed, 5, "the read replies to be deleted")

    async def expired() -> bool:
        return not await redis.exists(reply_key)

    await eventually(expired, 5, "the idle reply stream to expire")
    assert await slow.echo("again") == "again"  # a new reply stream serves the next call


# -- the reply dispatcher survives a clobbered reply key -------------------------------------------
async def test_the_dispatcher_survives_a_reply_key_overwritten_with_a_string(
    pm: ProcessManager, workers: Workers, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    workers.start(CLIENT_LOG, "--dep", f"log={log}")
    workers.wait_registered("client_log", 1)
    svc = await pm.connect("client_log")
    reply_key = pm.client.keys.reply("client_log", pm.client.client_id)
    errors: list[BaseException] = []

    async def waiting(tag: str) -> None:
        try:
            await svc.run(tag, 4.0)
        except TitanError as exc:
            errors.append(exc)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiting, "a")
        tg.start_soon(waiting, "b")
        await eventually(
            lambda: anyio.to_thread.run_sync(lambda: len(run_words(log)) == 2), what="both running"
        )
        await pm.client.redis.set(reply_key, "x")
    elapsed = time.monotonic() - started
    print(f"\nreply key clobbered: both waiting calls failed after {elapsed:.2f} s")
    assert len(errors) == 2
    for exc in errors:
        assert isinstance(exc, CallLost), repr(exc)
        assert reply_key in str(exc)
    assert await svc.run("later") == "later"  # the dispatcher lives on, on a fresh key
    assert await pm.client.redis.type(reply_key) == b"stream"
