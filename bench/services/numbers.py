"""The service bench_core measures: one small call and one small stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from titan_broker import process, public


@process(name="numbers")
class Numbers:
    @public
    async def add(self, a: int, b: int) -> int:
        return a + b

    @public
    async def count(self, n: int) -> AsyncIterator[int]:
        """The integers 0 .. n-1, one item each."""
        for i in range(n):
            yield i
