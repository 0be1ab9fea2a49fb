"""A periodic method under test: each run appends ``tick - <pid> <time>`` to a log."""

from __future__ import annotations

import os
import time
from pathlib import Path

from titan_broker import periodic, process


@process(name="ticker", version="1.0.0")
class Ticker:
    async def init(self, log: str) -> None:
        self.log = Path(log)

    @periodic(every=1)
    async def tick(self) -> int:
        with self.log.open("a") as f:
            f.write(f"tick - {os.getpid()} {time.time():.3f}\n")
        return os.getpid()
