"""Streaming's flow on the wire: several items to a message, never past the credit, woken by a grant."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis as sync_redis

from titan_broker import ProcessManager, WorkerOptions
from titan_broker._wire.keys import Keys
from titan_broker._wire.protocol import STREAM_WINDOW, Reply

from .conftest import SERVICES, Workers, wait_until
from .worker_harness import replies, send

STREAMER = SERVICES / "streamer.py"

anyio_mark = pytest.mark.anyio


def items_of(messages: list[Reply]) -> list[Any]:
    """The items of a stream's messages, checking that each message starts where the last ended."""
    items: list[Any] = []
    for message in messages:
        if message.end is not None:
            continue
        assert message.seq == len(items), (message.seq, len(items))
        items += message.items or []
    return items


def settled_count(client: sync_redis.Redis, reply_key: str, samples: int = 3) -> int:
    """How many items the reply stream holds once that number stays the same, 0.1 s apart."""
    history: list[int] = []
    deadline = time.monotonic() + 10
    while len(history) < samples or len(set(history[-samples:])) > 1:
        assert time.monotonic() < deadline, f"the stream never settled: {history}"
        if history:
            time.sleep(0.1)
        history.append(len(items_of(replies(client, reply_key))))
    return history[-1]


def call_id_of(client: sync_redis.Redis, reply_key: str) -> str:
    wait_until(lambda: replies(client, reply_key), 15, "the first message")
    return replies(client, reply_key)[0].call_id


def test_a_fast_producer_sends_several_items_per_message_and_stops_at_the_credit(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    workers.start(STREAMER)
    workers.wait_registered("streamer", 1)
    reply_key, _ = send(sync_client, keys, "streamer", "numbers", (10_000,), deadline_in=60)
    call_id = call_id_of(sync_client, reply_key)
    try:
        assert settled_count(sync_client, reply_key) == STREAM_WINDOW  # the first window, and no more
        messages = replies(sync_client, reply_key)
        assert items_of(messages) == list(range(STREAM_WINDOW))
        assert len(messages) < STREAM_WINDOW  # items made during a write went out together
    finally:
        sync_client.hset(keys.stream_control("streamer", call_id), "cancel", 1)


def test_credit_pushed_on_the_wake_list_alone_moves_the_worker(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    """A worker out of credit waits on the wake list: a token there, with the control hash unchanged
    (so no poll of it would find more credit), lets it send up to the new credit."""
    workers.start(STREAMER)
    workers.wait_registered("streamer", 1)
    reply_key, _ = send(sync_client, keys, "streamer", "numbers", (10_000,), deadline_in=60)
    call_id = call_id_of(sync_client, reply_key)
    try:
        assert settled_count(sync_client, reply_key) == STREAM_WINDOW
        sync_client.rpush(keys.stream_wake("streamer", call_id), 3 * STREAM_WINDOW)
        assert settled_count(sync_client, reply_key) == 3 * STREAM_WINDOW
        assert items_of(replies(sync_client, reply_key)) == list(range(3 * STREAM_WINDOW))
    finally:
        sync_client.hset(keys.stream_control("streamer", call_id), "cancel", 1)


def test_every_message_keeps_within_the_size_limit(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    workers.start(STREAMER, "--max-payload", "10000")
    workers.wait_registered("streamer", 1)
    reply_key, _ = send(sync_client, keys, "streamer", "blobs", (20, 3000), deadline_in=60)
    wait_until(lambda: any(r.end is not None for r in replies(sync_client, reply_key)), 15, "the end")
    sizes = [len(fields[b"reply"]) for _id, fields in sync_client.xrange(reply_key)]
    assert max(sizes) <= 10_000, sizes
    assert items_of(replies(sync_client, reply_key)) == [bytes([i]) * 3000 for i in range(20)]
    assert replies(sync_client, reply_key)[-1].end == 20


@anyio_mark
async def test_a_caller_that_leaves_in_the_middle_of_a_message_stops_the_producer(pm: ProcessManager) -> None:
    svc = await pm.spawn(STREAMER, options=WorkerOptions(concurrency=1))
    taken = 0
    async for item in svc.numbers(1_000_000):
        assert item == taken
        taken += 1
        if taken == STREAM_WINDOW + 5:  # within the second window's messages
            break
    # The only slot is free again: the stream ended at the caller's leaving, not at its deadline.
    assert [i async for i in svc.numbers(3)] == [0, 1, 2]
    produced = await svc.produced_so_far()
    assert produced <= taken + STREAM_WINDOW + 1 + 3, produced
