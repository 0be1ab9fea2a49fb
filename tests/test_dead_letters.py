"""Dead letters: listed, replayed with a new deadline, purged, capped; from Python and the CLI."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import anyio
import pytest
import redis as sync_redis

from titan_broker import (
    DeadLettered,
    ProcessManager,
    WorkerOptions,
)
from titan_broker._wire.keys import Keys
from titan_broker._wire.protocol import dead_letter_fields, encode_request

from .conftest import (
    CALCULATOR,
    CHAOS,
    FAST_FAILOVER,
    Workers,
    eventually,
    in_thread,
    run_log_dep,
    titan,
    wait_until,
)
from .worker_harness import (
    EDGE,
    first_reply,
    runs,
)

pytestmark = pytest.mark.anyio


async def test_dead_letters_list_replay_and_purge(
    workers: Workers, pm: ProcessManager, keys: Keys, tmp_path: Path
) -> None:
    marker = tmp_path / "allowed"
    for _ in range(3):
        workers.start(CHAOS, *FAST_FAILOVER)
    workers.wait_registered("chaos", 3)
    with pytest.raises(DeadLettered):
        await pm.client.call("chaos", "crash_unless", (str(marker),), timeout=30)
    [letter] = await pm.dead_letters("chaos")
    assert letter.method == "crash_unless"
    assert letter.deliveries == 3
    assert letter.arguments == [[str(marker)], {}]
    assert "dead letters of 'chaos'" in letter.reason
    assert letter.reason.startswith("crash_unless() was delivered 3 times (max_deliveries 2)")
    marker.write_text("")
    assert await pm.replay_dead_letters("chaos") == 1
    await in_thread(wait_until, lambda: marker.read_text() == "ran\n", 15, "the replayed call to run")
    assert await pm.dead_letters("chaos") == []
    # Purge: dead-letter an unanswerable entry (no reply key), then remove it.
    await pm.client.redis.xadd(keys.calls("chaos"), {b"junk": b"\xff"})
    letters = await anyio.to_thread.run_sync(
        lambda: wait_until(lambda: anyio.from_thread.run(pm.dead_letters, "chaos"), 10, "a dead letter")
    )
    assert "unanswerable request" in letters[0].reason
    assert await pm.purge_dead_letters("chaos") == 1
    assert await pm.dead_letters("chaos") == []


async def test_cli_dead_letters(workers: Workers, redis_url: str, namespace: str, keys: Keys) -> None:
    workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    redis = sync_redis.Redis.from_url(redis_url)
    redis.xadd(keys.calls("calculator"), {b"junk": b"1"})
    redis.close()

    def listing() -> list[dict[str, object]]:
        return json.loads(titan(redis_url, namespace, "dead-letters", "calculator", "--json").stdout)  # type: ignore[no-any-return]

    listed = await in_thread(wait_until, listing, 10, "a dead letter")
    assert len(listed) == 1 and "unanswerable" in listed[0]["reason"]
    table = titan(redis_url, namespace, "dead-letters", "calculator")
    assert "unanswerable" in table.stdout
    replayed = titan(redis_url, namespace, "dead-letters", "calculator", "--replay", "--json")
    assert json.loads(replayed.stdout) == {"replayed": 1}
    # Junk stays junk: the worker dead-letters it again, with a new id.
    again = await in_thread(
        wait_until, lambda: [d for d in listing() if d["id"] != listed[0]["id"]], 10, "the replayed junk"
    )
    assert len(again) == 1 and len(listing()) == 1
    purged = titan(redis_url, namespace, "dead-letters", "calculator", "--purge", "--yes", "--json")
    assert json.loads(purged.stdout) == {"purged": 1}
    assert listing() == []


# -- "dead-letter streams are capped"
async def test_dead_letters_are_capped(pm: ProcessManager, keys: Keys) -> None:
    cap = 50
    await pm.spawn(CALCULATOR, options=WorkerOptions(dead_letter_maxlen=cap))
    redis = pm.client.redis
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(600):  # unanswerable entries: each one is dead-lettered
            pipe.xadd(keys.calls("calculator"), {b"junk": str(i).encode()})
        await pipe.execute()

    async def settled() -> bool:
        return await redis.xlen(keys.calls("calculator")) == 0

    await eventually(settled, 30, "the worker to dead-letter every entry")
    kept = await redis.xlen(keys.dead("calculator"))
    print(f"\n600 dead letters with dead_letter_maxlen={cap}: {kept} kept")
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): never below the cap,
    # at most one node over.
    assert cap <= kept <= cap + 100
    newest = await redis.xrevrange(keys.dead("calculator"), count=1)
    assert newest, "the newest dead letter is kept"


async def test_a_replayed_dead_letter_gets_a_new_deadline(
    workers: Workers, pm: ProcessManager, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """A dead letter's call had a deadline long gone (ttl 0); replayed, it runs within the new one."""
    log = tmp_path / "runs.log"
    workers.start(EDGE, *run_log_dep(log))
    await in_thread(workers.wait_registered, "edge", 1)
    reply_key = keys.reply("edge", f"replay-{uuid.uuid4().hex[:8]}")
    fields = encode_request("replayed-1", "nap", (7, 0.0), {}, reply_key, 0)
    dead = dead_letter_fields(fields, reason="test", deliveries=3, worker="gone", source_id=b"1-0")
    sync_client.xadd(keys.dead("edge"), dead)  # type: ignore[arg-type]
    assert await pm.replay_dead_letters("edge", timeout=30) == 1
    reply = await in_thread(first_reply, sync_client, reply_key)
    assert reply.ok and reply.value["n"] == 7, reply
    assert len(runs(log, "nap 7")) == 1
