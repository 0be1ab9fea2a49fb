"""A test service that streams its results."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from titan_broker import process, public


@process(name="streamer", version="0.1.0")
class Streamer:
    async def init(self, marker: str | None = None) -> None:
        self.marker = marker
        self.produced = 0

    @public
    async def numbers(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            self.produced += 1
            yield i

    @public
    async def ticks(self) -> AsyncIterator[int]:
        """Endless; notes in the marker file when it is stopped."""
        i = 0
        try:
            while True:
                await anyio.sleep(0.01)
                yield i
                i += 1
        finally:
            if self.marker:
                Path(self.marker).write_text(f"stopped after {i}\n")  # noqa: ASYNC240 - tiny, in a finally

    @public
    async def then_fail(self) -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ValueError("broke after two")

    @public
    async def big(self, size: int) -> AsyncIterator[bytes]:
        yield b"small"
        yield b"x" * size

    @public
    async def produced_so_far(self) -> int:
        return self.produced

    @public
    async def blobs(self, n: int, size: int) -> AsyncIterator[bytes]:
        for i in range(n):
            self.produced += 1
            yield bytes([i % 256]) * size
