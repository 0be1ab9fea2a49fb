"""Streaming: an async generator's items reach the caller in order, with backpressure and early stop."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as sync_redis

from titan_broker import (
    CallLost,
    CallTimeout,
    DeadlineExceeded,
    InternalError,
    PayloadTooLarge,
    ProcessManager,
    RemoteError,
    TitanError,
    WorkerOptions,
)
from titan_broker._wire.keys import Keys
from titan_broker._wire.protocol import (
    F_ID,
    F_REPLY,
    F_REPLY_VALUE,
    STREAM_WINDOW,
    decode_reply,
    encode_end,
    encode_items,
    pack,
)

from .conftest import SERVICES, Workers, eventually, managed_workers, wait_until
from .worker_harness import (
    EDGE,
    ping,
    send,
)

pytestmark = pytest.mark.anyio

STREAMER = SERVICES / "streamer.py"


async def collect(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


async def test_items_arrive_in_order(pm: ProcessManager) -> None:
    svc = await pm.spawn(STREAMER)
    assert await collect(svc.numbers(200)) == list(range(200))
    assert await collect(svc.numbers(0)) == []


async def test_connected_proxy_knows_the_streaming_methods(pm: ProcessManager) -> None:
    await pm.spawn(STREAMER)
    remote = await pm.connect("streamer")
    assert await collect(remote.numbers(3)) == [0, 1, 2]
    assert await collect(pm.client.stream("streamer", "numbers", (2,))) == [0, 1]


async def settled(read: Callable[[], Awaitable[int]], samples: int = 3, timeout: float = 10.0) -> int:
    """``read()`` once it gives the same value ``samples`` times in a row, 0.1 s apart."""
    history: list[int] = []
    with anyio.fail_after(timeout):
        while len(history) < samples or len(set(history[-samples:])) > 1:
            if history:
                await anyio.sleep(0.1)
            history.append(await read())
    return history[-1]


async def test_the_producer_runs_one_window_ahead_of_a_stalled_consumer_and_no_further(
    pm: ProcessManager,
) -> None:
    """The lead of the producer (items it made minus items the caller took) stays within the window.

    At each pause the consumer stops taking items until the producer has stopped too: its
    lead is then at most STREAM_WINDOW, exactly STREAM_WINDOW when the caller has just granted
    credit (or not yet taken anything), and never below half a window (it does work ahead).
    """
    svc = await pm.spawn(STREAMER)
    total, pauses = 8 * STREAM_WINDOW, (1, 8, 16, 17, 40, 100)
    lead: dict[int, int] = {}
    consumed = 0
    async for item in svc.numbers(total):
        assert item == consumed
        consumed += 1
        if consumed in pauses:
            lead[consumed] = await settled(svc.produced_so_far) - consumed
    assert consumed == total
    print(f"\nproducer's lead at each pause of the consumer: {lead}")
    assert all(STREAM_WINDOW // 2 < n <= STREAM_WINDOW for n in lead.values()), lead
    assert lead[1] == STREAM_WINDOW  # the whole window is used, and not one item more
    assert max(lead.values()) == STREAM_WINDOW


async def test_stopping_early_stops_the_producer(pm: ProcessManager, tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    svc = await pm.spawn(STREAMER, dependencies={"marker": str(marker)}, concurrency=1)
    got = []
    async for tick in svc.ticks():
        got.append(tick)
        if len(got) == 3:
            break
    assert got == [0, 1, 2]

    async def stopped() -> str | None:
        return marker.read_text() if marker.exists() else None

    note = await eventually(stopped, 5, "the producer to stop")
    # Stopped at the item it was holding: after the 3 taken, within the window's credit.
    assert 2 <= int(note.split()[-1]) <= STREAM_WINDOW
    # Its only slot is free again.
    assert await collect(svc.numbers(2)) == [0, 1]


async def test_an_error_mid_stream_comes_after_the_items_sent(pm: ProcessManager) -> None:
    svc = await pm.spawn(STREAMER)
    got = []
    with pytest.raises(RemoteError, match="broke after two") as info:
        async for item in svc.then_fail():
            got.append(item)
    assert got == [1, 2]
    assert info.value.type == "ValueError" and info.value.details["items"] == 2


async def test_each_item_obeys_the_size_limit(pm: ProcessManager) -> None:
    svc = await pm.spawn(STREAMER, options=WorkerOptions(max_payload=10_000))
    got = []
    with pytest.raises(PayloadTooLarge, match="item 1 of big"):
        async for item in svc.big(20_000):
            got.append(item)
    assert got == [b"small"]


async def test_awaiting_a_streaming_method_says_to_iterate(pm: ProcessManager) -> None:
    await pm.spawn(STREAMER)
    with pytest.raises(TitanError, match="iterate it with 'async for'") as info:
        await pm.client.call("streamer", "numbers", (3,))
    assert info.type is TitanError  # a usage error here, not a remote one


async def test_the_timeout_bounds_the_whole_stream(pm: ProcessManager) -> None:
    svc = await pm.spawn(STREAMER)
    got = []
    started = time.monotonic()
    # The caller's own timeout, or the worker's cancellation at the same deadline if it comes first.
    with pytest.raises((CallTimeout, DeadlineExceeded)):
        async for tick in svc.with_options(timeout=0.5).ticks():
            got.append(tick)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 0.5 + 2.0
    assert 5 < len(got) < 200


# --- a stream nobody reads --------------------------------------------------------------------
def items_in(client: sync_redis.Redis, reply_key: str) -> int:
    """How many stream items the messages on a reply stream hold."""
    messages = (decode_reply(fields[F_REPLY_VALUE]) for _id, fields in client.xrange(reply_key))
    return sum(len(m.items or ()) for m in messages if m is not None)


def test_reply_stream_of_an_unread_streaming_call_has_a_ttl(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    workers.start(EDGE)
    workers.wait_registered("edge", 1)
    reply_key, _ = send(sync_client, keys, "edge", "numbers", (1000,), deadline_in=60)
    try:
        wait_until(lambda: sync_client.exists(reply_key), 15, "the first item")
        assert sync_client.pttl(reply_key) > 0, "the reply stream has no TTL after the first item"
        # The worker fills the caller's window (32 items), then waits for credit that never comes.
        wait_until(lambda: items_in(sync_client, reply_key) >= 32, 15, "a window of items")
        assert sync_client.pttl(reply_key) > 0, "the reply stream has no TTL while the worker waits"
    finally:
        for _entry_id, fields in sync_client.xrange(reply_key, count=1):  # stop the producer
            item = decode_reply(fields[F_REPLY_VALUE])
            if item is not None:
                sync_client.hset(keys.stream_control("edge", item.call_id), "cancel", 1)
    ping(sync_client, keys)


async def test_items_missing_from_the_stream_fail_the_call_with_call_lost(
    pm: ProcessManager, keys: Keys
) -> None:
    """Items lost on the way (a failover that lost the latest writes to the reply stream) must not be
    skipped: an item past the next one expected fails the call with CallLost, naming the gap."""
    svc = await pm.spawn(STREAMER)
    got: list[int] = []
    with anyio.fail_after(20), pytest.raises(CallLost, match=r"item 5\d\d"):
        async for tick in svc.ticks():
            got.append(tick)
            if len(got) == 1:
                [(_id, fields)] = await pm.client.redis.xrange(keys.calls("streamer"))
                call_id, reply_to = fields[F_ID].decode(), fields[F_REPLY]
                # A message from further on than any seen: the items between were lost.
                lost = encode_items(call_id, 500, [pack(500)], "elsewhere")
                await pm.client.redis.xadd(reply_to, {F_REPLY_VALUE: lost})
    assert got == list(range(len(got))) and all(i < 500 for i in got)


async def test_an_end_after_items_that_were_lost_fails_the_call_with_call_lost(
    pm: ProcessManager, keys: Keys
) -> None:
    """The last items lost on the way and the end read (a failover that lost writes the end then
    followed): the end says how many items there were, so the stream is not ended short silently."""
    svc = await pm.spawn(STREAMER)
    got: list[int] = []
    with anyio.fail_after(20), pytest.raises(CallLost, match=r"items \d+ to 499"):
        async for tick in svc.ticks():
            got.append(tick)
            if len(got) == 1:
                [(_id, fields)] = await pm.client.redis.xrange(keys.calls("streamer"))
                call_id, reply_to = fields[F_ID].decode(), fields[F_REPLY]
                # The end of 500 items, next after the first: the items between were lost.
                await pm.client.redis.xadd(reply_to, {F_REPLY_VALUE: encode_end(call_id, 500, "elsewhere")})
    assert got == list(range(len(got))) and len(got) < 500


async def test_redis_failing_under_a_stream_is_an_internal_error_not_the_methods(pm: ProcessManager) -> None:
    """The worker's own Redis traffic for a stream (waiting for credit) failing is the worker's failure
    (InternalError), never reported as an exception the method raised (a @retry on ConnectionError
    would take it for the method's own)."""
    svc = await pm.spawn(STREAMER)
    admin = pm.client.redis

    [worker] = managed_workers()

    async def blocked_in_blpop() -> set[int]:
        ports = {f"127.0.0.1:{c.laddr.port}" for c in worker.net_connections("tcp") if c.laddr}
        clients = await admin.client_list()
        return {int(c["id"]) for c in clients if c.get("cmd") == "blpop" and c["addr"] in ports}

    before = await blocked_in_blpop()  # the worker's own waits, not the stream's

    async def waiting_for_credit() -> set[int]:
        return await blocked_in_blpop() - before

    got: list[int] = []
    with anyio.fail_after(30), pytest.raises(RemoteError) as raised:
        async for tick in svc.ticks():
            got.append(tick)
            if len(got) == 1:  # stop reading: the producer spends its credit, then waits for more
                for client_id in await eventually(waiting_for_credit, 10, "the producer to wait for credit"):
                    await admin.client_kill_filter(_id=client_id)
    assert isinstance(raised.value, InternalError), raised.value
    assert got == list(range(len(got)))
