"""Version 2 of the service of edge_v1.py: it adds ``new_method``."""

from __future__ import annotations

import os

from titan_broker import process, public


@process(name="edge-upgrade", version="2.0.0")
class EdgeUpgrade:
    @public
    async def old_method(self) -> str:
        return f"v2 {os.getpid()}"

    @public
    async def new_method(self, i: int) -> list[int]:
        return [i, os.getpid()]
