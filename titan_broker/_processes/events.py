"""Lifecycle events of the workers a ProcessManager runs, for observers and logs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
from anyio.streams.memory import MemoryObjectSendStream

logger = logging.getLogger("titan_broker.events")  # a name users configure: it does not follow the file

EventKind = Literal[
    "spawned", "ready", "crashed", "restarted", "failed", "scaled", "unhealthy", "recycled", "stopped"
]


@dataclass(frozen=True)
class Event:
    """Something that happened to a worker or a pool."""

    kind: EventKind
    service: str
    worker_id: str | None = None
    pid: int | None = None
    detail: str = ""
    at: float = field(default_factory=time.time)

    def __str__(self) -> str:
        who = f" {self.worker_id} (pid {self.pid})" if self.worker_id else ""
        return f"{self.kind}: {self.service}{who}{': ' + self.detail if self.detail else ''}"


class EventBus:
    """Fans events out to callbacks and to async iterators; a slow iterator loses old events, never blocks."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Event], object]] = []
        self._streams: list[MemoryObjectSendStream[Event]] = []

    def emit(self, event: Event) -> None:
        level = logging.WARNING if event.kind in ("crashed", "failed", "unhealthy") else logging.INFO
        logger.log(level, "%s", event)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                logger.exception("event callback %r failed", callback)
        for stream in list(self._streams):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                logger.warning("an event subscriber is not keeping up; dropped %s", event.kind)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._streams.remove(stream)

    def on(self, callback: Callable[[Event], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns a function that unsubscribes."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    async def subscribe(self, buffer: int = 1000) -> AsyncIterator[Event]:
        """Iterate over events from now on, until the iterator is closed."""
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        self._streams.append(send)
        try:
            async with receive:
                async for event in receive:
                    yield event
        finally:
            if send in self._streams:
                self._streams.remove(send)
            send.close()

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams.clear()
