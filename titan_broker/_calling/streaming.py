"""A streaming call from the caller's side: items as they come, within a credit window.

The worker stays at most STREAM_WINDOW items ahead: every half window
consumed, the caller raises its credit in the call's stream hash and pushes
it onto the call's wake list, where a worker out of credit waits. Leaving
the loop early (or any error) tells the worker to stop and deletes the
request if no worker took it yet. A worker that took the call over replays
it from the start; items already seen are skipped. An item past the next one
expected, or an end counting more items than came, means Redis lost some (a
failover): the call fails with CallLost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio

from .._errors import CallLost, TitanError
from .._wire import protocol
from .._wire.keys import Keys
from .replies import Placement, StreamItem, error_of
from .routing import LiveWorkers, probe_margin

if TYPE_CHECKING:
    from .links import Link


class StreamRequest(NamedTuple):
    service: str
    scope: str
    """The scope of the shard the call goes to (the service's own for one shard, or with a key)."""
    method: str
    call_id: str
    fields: dict[bytes, bytes]
    timeout: float
    key: str | None
    wait_for_worker: bool


async def stream_items(
    request: StreamRequest,
    link_for: Callable[[str, float], Awaitable[Link]],
    workers: LiveWorkers,
    keys: Keys,
) -> AsyncGenerator[Any, None]:
    """The items of a streaming call, as they come (see ``Client.stream``)."""
    service, scope, method, call_id, fields, timeout, key, wait_for_worker = request
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if not wait_for_worker:  # before a link opens: no connections for a service nobody serves
        await workers.require_worker(service, method, deadline)
    link = await link_for(scope, deadline)
    dispatcher, sender = link.dispatcher, link.sender
    control, wake = keys.stream_control(scope, call_id), keys.stream_wake(scope, call_id)
    window = protocol.STREAM_WINDOW
    send, receive = anyio.create_memory_object_stream[StreamItem](window * 2 + 8)
    dispatcher.expect_stream(call_id, send)
    sent: Placement | None = None
    finished = False
    probe: asyncio.TimerHandle | None = None
    try:
        worker = await workers.worker_for(service, method, key, deadline) if key is not None else None
        sent = await sender.send(scope, method, fields, worker, deadline, timeout)
        dispatcher.placed(call_id, sent)
        probe = loop.call_at(deadline - probe_margin(timeout), workers.probe, None, service)
        received = 0
        while True:
            item: StreamItem | None = None
            with anyio.move_on_after(deadline - loop.time()):
                try:
                    item = await receive.receive()
                except anyio.EndOfStream:
                    item = dispatcher.failure(call_id) or TitanError(f"{service}.{method}() lost")
            if item is None:
                raise workers.timeout_error(service, method, timeout, loop.time() - timeout)
            if isinstance(item, TitanError):
                raise item
            if not item.ok:
                finished = True
                raise error_of(item)
            if item.end is not None:
                if item.end > received:  # the last items were lost, the end was not: never short silently
                    raise CallLost(
                        f"{service}.{method}() lost stream items {received} to {item.end - 1}: its end came "
                        "next (Redis lost writes to the reply stream: a failover or a restart)"
                    )
                finished = True
                return
            if item.seq is None or item.items is None:
                finished = True
                raise TitanError(f"{service}.{method}() does not stream: await it instead of iterating")
            if item.seq > received:  # never skipped silently: the caller would miss items
                raise CallLost(
                    f"{service}.{method}() lost stream items {received} to {item.seq - 1}: item {item.seq} "
                    "came next (Redis lost writes to the reply stream: a failover or a restart)"
                )
            # Items before ``received`` were replayed from the start by a worker that took the call over.
            for value in item.items[max(0, received - item.seq) :]:
                received += 1
                yield value
                if received % (window // 2) == 0:
                    await sender.grant(control, wake, received + window, deadline)
    finally:
        if probe is not None:
            probe.cancel()
        dispatcher.forget(call_id)
        send.close()
        receive.close()
        if sent is not None and not finished:
            sender.withdraw(sent, deadline, control, call_id)
