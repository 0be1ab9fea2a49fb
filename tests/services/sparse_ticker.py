"""Schedules whose ticks are far apart: every 4 s, nightly at 03:00 and on New Year (UTC).

Each run appends ``<method> - <pid> <time>`` to a log.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from titan_broker import periodic, process


@process(name="sparse_ticker", version="1.0.0")
class SparseTicker:
    async def init(self, log: str) -> None:
        self.log = Path(log)

    def _record(self, what: str) -> None:
        with self.log.open("a") as f:
            f.write(f"{what} - {os.getpid()} {time.time():.3f}\n")

    @periodic(every=4)
    async def tick(self) -> None:
        self._record("tick")

    @periodic(cron="0 3 * * *")
    async def nightly(self) -> None:
        self._record("nightly")

    @periodic(cron="0 0 1 1 *")
    async def yearly(self) -> None:
        self._record("yearly")
