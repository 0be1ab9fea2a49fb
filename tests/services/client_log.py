"""A test service for the calling side: notes every call it runs in a log file (dependency ``log``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from titan_broker import process, public


@process(name="client_log", version="1.0.0")
class ClientLog:
    async def init(self, log: str = "") -> None:
        self.log = Path(log) if log else None

    def _note(self, tag: str) -> None:
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(tag + "\n")

    @public
    async def run(self, tag: str, seconds: float = 0.0) -> str:
        """Note ``tag`` in the log as it starts, then take ``seconds``."""
        self._note(tag)
        await anyio.sleep(seconds)
        return tag

    @public
    async def boom(self) -> None:
        raise ValueError("boom")

    @public
    async def count(self, n: int, delay: float = 0.0) -> AsyncIterator[int]:
        """Stream 0 .. n-1, waiting ``delay`` before each item."""
        for i in range(n):
            await anyio.sleep(delay)
            yield i
