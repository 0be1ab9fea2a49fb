"""Streaming: an async generator's items reach the caller in order, with backpressure and early stop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from titan_broker import PayloadTooLarge, ProcessManager, RemoteError, TitanError, WorkerOptions
from titan_broker.protocol import STREAM_WINDOW

from .conftest import SERVICES, eventually

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


async def test_the_producer_stays_within_the_window_of_a_slow_consumer(pm: ProcessManager) -> None:
    svc = await pm.spawn(STREAMER)
    ahead = []
    consumed = 0
    async for _ in svc.numbers(4 * STREAM_WINDOW):
        consumed += 1
        if consumed % 8 == 0:
            await anyio.sleep(0.3)  # a slow consumer: the producer must wait for it
            ahead.append(await svc.produced_so_far() - consumed)
    assert consumed == 4 * STREAM_WINDOW
    assert max(ahead) <= STREAM_WINDOW + 1, ahead


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
    assert int(note.split()[-1]) < 3 + STREAM_WINDOW + 5
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
    with pytest.raises(TitanError, match="iterate it with 'async for'"):
        await pm.client.call("streamer", "numbers", (3,))


async def test_the_timeout_bounds_the_whole_stream(pm: ProcessManager) -> None:
    svc = await pm.spawn(STREAMER)
    from titan_broker import CallTimeout

    got = []
    with pytest.raises((CallTimeout, RemoteError)):
        async for tick in svc.with_options(timeout=0.5).ticks():
            got.append(tick)
    assert 5 < len(got) < 200
