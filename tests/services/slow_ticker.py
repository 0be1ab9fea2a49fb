"""Periodic methods at their edges: a run longer than its period, and a name that is not ASCII."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio

from titan_broker import periodic, process


@process(name="slow_ticker", version="1.0.0")
class SlowTicker:
    async def init(self, log: str) -> None:
        self.log = Path(log)

    def _record(self, what: str, tag: str) -> None:
        with self.log.open("a") as f:
            f.write(f"{what} {tag} {os.getpid()} {time.time():.3f}\n")

    @periodic(every=1)
    async def long_run(self) -> None:
        self._record("start", "long")
        await anyio.sleep(1.5)  # longer than its period: not cut at the next tick
        self._record("end", "long")

    @periodic(every=1)
    async def größe(self) -> None:  # a legal name, not a job token: the run must still happen
        self._record("größe", "-")
