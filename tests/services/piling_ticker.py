"""A periodic method whose runs last longer than its period: every 2 s, 5 s each.

Each run appends ``start - <pid> <time>`` when it begins and ``end - <pid> <time>`` when it ends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio

from titan_broker import periodic, process


@process(name="piling_ticker", version="1.0.0")
class PilingTicker:
    async def init(self, log: str) -> None:
        self.log = Path(log)

    def _record(self, what: str) -> None:
        with self.log.open("a") as f:
            f.write(f"{what} - {os.getpid()} {time.time():.3f}\n")

    @periodic(every=2)
    async def long(self) -> None:
        self._record("start")
        await anyio.sleep(5)
        self._record("end")
