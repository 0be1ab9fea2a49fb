"""A test service for serve(): streaming, a deadline, a health check and @on_shutdown, in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from titan_broker import Health, health_check, metric, on_shutdown, process, public


@process(name="lifecycle", version="1.0.0")
class Lifecycle:
    async def init(self, log: list[str]) -> None:
        self.log = log  # the caller's own list: serve() hands dependencies over as they are

    @public
    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @public
    @metric
    async def nap(self, seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    @health_check
    async def health(self) -> Health:
        return Health("healthy")

    @on_shutdown
    async def close(self) -> None:
        self.log.append("closed")
