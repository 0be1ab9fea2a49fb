"""Version 1 of the 'versioned' service, for rolling-upgrade discovery tests."""

from __future__ import annotations

from titan_broker import process, public


@process(name="versioned", version="1.0.0")
class Versioned:
    """A service in the middle of a deploy: this is the old version."""

    @public
    async def hello(self) -> str:
        return "v1"
