"""How long to wait before trying Redis again: one policy for every retry loop."""

from __future__ import annotations

import anyio


class Backoff:
    """Delays that double from ``first`` up to ``cap``; ``reset()`` after a success."""

    __slots__ = ("cap", "delay", "first")

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def next(self) -> float:
        """The delay to wait now; the one after it is twice as long, up to ``cap``."""
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self, limit: float | None = None) -> None:
        """Wait the next delay (at most ``limit`` seconds when given)."""
        delay = self.next()
        await anyio.sleep(delay if limit is None else max(0.0, min(delay, limit)))
