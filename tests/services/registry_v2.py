"""Version 2 of the 'versioned' service: one method more than version 1."""

from __future__ import annotations

from titan_broker import process, public


@process(name="versioned", version="2.0.0")
class Versioned:
    """A service in the middle of a deploy: this is the new version."""

    @public
    async def hello(self) -> str:
        return "v2"

    @public
    async def added(self, n: int) -> int:
        return n + 1
