"""Background jobs under test: each run appends a line to a log (``<what> <tag> <pid> <time>``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio

from titan_broker import process, public, retry


@process(name="tasks", version="1.0.0")
class Tasks:
    async def init(self, log: str) -> None:
        self.log = Path(log)

    def _record(self, what: str, tag: str) -> None:
        with self.log.open("a") as f:
            f.write(f"{what} {tag} {os.getpid()} {time.time():.3f}\n")

    def _runs(self, what: str, tag: str) -> int:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return sum(1 for line in lines if line.split()[:2] == [what, tag])

    @public
    async def add(self, a: float, b: float, tag: str = "-") -> float:
        self._record("add", tag)
        return a + b

    @public
    async def slow(self, seconds: float, tag: str) -> str:
        self._record("start", tag)
        await anyio.sleep(seconds)
        self._record("end", tag)
        return tag

    @public
    @retry(attempts=3, on=ConnectionError, backoff=0.3, jitter=False)
    async def flaky(self, fail_times: int, tag: str) -> str:
        self._record("flaky", tag)
        run = self._runs("flaky", tag)
        if run <= fail_times:
            raise ConnectionError(f"run {run} of {tag} failed")
        return f"ok after {run}"

    @public
    @retry(attempts=3, on=ConnectionError, backoff=0.1)
    async def wrong_error(self, tag: str) -> None:
        self._record("wrong", tag)
        raise ValueError("not a ConnectionError: not retried")
