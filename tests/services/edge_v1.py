"""Version 1 of a service in a rolling upgrade (edge_v2.py is version 2, with one more method)."""

from __future__ import annotations

import os

from titan_broker import process, public


@process(name="edge-upgrade", version="1.0.0")
class EdgeUpgrade:
    @public
    async def old_method(self) -> str:
        return f"v1 {os.getpid()}"
