"""A CPU-bound service for the pool benchmark."""

from __future__ import annotations

from titan_broker import process, public


@process(name="cpu-bench")
class CpuBench:
    @public
    def crunch(self, n: int) -> int:
        """Pure-Python work: the sum of i*i mod 7 for i < n (a plain def: it runs in a thread)."""
        total = 0
        for i in range(n):
            total += i * i % 7
        return total
