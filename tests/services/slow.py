"""A test service with slow calls, a concurrency gauge and an on-shutdown marker file."""

from __future__ import annotations

import os

import anyio

from titan_broker import on_shutdown, process, public


@process(name="slow", version="0.1.0")
class Slow:
    async def init(self, marker: str | None = None) -> None:
        self.marker = marker
        self.running = 0
        self.max_running = 0

    @public
    async def sleep(self, seconds: float, tag: int = 0) -> dict[str, int]:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await anyio.sleep(seconds)
        finally:
            self.running -= 1
        return {"pid": os.getpid(), "tag": tag}

    @public
    async def max_concurrency(self) -> int:
        return self.max_running

    @public
    async def echo(self, value: object) -> object:
        return value

    @public
    async def unencodable(self) -> object:
        return object()

    @public
    def blocking_pid(self) -> int:
        return os.getpid()

    @on_shutdown
    async def write_marker(self) -> None:
        if self.marker:
            await anyio.Path(self.marker).write_text(f"shutdown after max {self.max_running}\n")
