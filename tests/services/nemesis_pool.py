"""The nemesis run's second service, served by a pool the run scales up and down."""

from __future__ import annotations

import os

import anyio

from titan_broker import process, public


@process(name="nem-pool", version="1.0.0")
class NemesisPool:
    @public
    async def echo(self, token: str, ms: float) -> list[object]:
        await anyio.sleep(ms / 1000)
        return [token, "", os.getpid()]
