"""The nemesis run's service: every run notes its start and end in a shared log (JSON lines).

Each line is ``{"k": "run_start" | "run_end" | "tick", "t": <time.monotonic()>, "token": ...,
"nonce": ..., "pid": ...}``. Monotonic time is the one clock every process on the host shares, and
the one the clock-shift fault leaves alone. A success's value carries its run's nonce, so the
checker can tell the run that produced it.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio

from titan_broker import periodic, process, public, retry

if "libfaketime" in os.environ.get("LD_PRELOAD", ""):
    # libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC (the clock-shift fault's set-up) fails
    # every absolute sleep on the monotonic clock, which is how Python's time.sleep waits: EINVAL,
    # in any code that sleeps (redis-py's retries on a worker's heartbeat connection among them).
    # A timed wait on an event waits the same time and works under it.
    _NEVER_SET = threading.Event()

    def _sleep(seconds: float) -> None:
        _NEVER_SET.wait(seconds)

    time.sleep = _sleep


class Flaky(KeyError):
    """Raised by ``flaky`` on its first runs; @retry runs it again."""


@process(name="nem", version="1.0.0", max_backlog=100_000)
class NemesisWork:
    async def init(self, log: str) -> None:
        self.log = log
        self.pid = os.getpid()

    def _note(self, kind: str, token: str, nonce: str, **more: Any) -> None:
        line = json.dumps({"k": kind, "t": round(time.monotonic(), 4), "token": token, "nonce": nonce,
                           "pid": self.pid, **more})  # fmt: skip
        with open(self.log, "a") as f:
            f.write(line + "\n")

    @public
    async def echo(self, token: str, ms: float) -> list[Any]:
        """Sleep ``ms`` milliseconds; return [token, this run's nonce, pid]."""
        nonce = uuid.uuid4().hex[:12]
        self._note("run_start", token, nonce)
        try:
            await anyio.sleep(ms / 1000)
        finally:
            self._note("run_end", token, nonce)
        return [token, nonce, self.pid]

    @public
    async def boom(self, token: str) -> None:
        """Always raises ValueError (a method's own error)."""
        nonce = uuid.uuid4().hex[:12]
        self._note("run_start", token, nonce)
        self._note("run_end", token, nonce)
        raise ValueError(f"boom {token}")

    @public
    async def numbers(self, token: str, n: int) -> AsyncIterator[int]:
        """Stream 0 .. n-1, a few milliseconds apart."""
        nonce = uuid.uuid4().hex[:12]
        self._note("run_start", token, nonce)
        try:
            for i in range(n):
                await anyio.sleep(0.003)
                yield i
        finally:
            self._note("run_end", token, nonce)

    @public
    @retry(attempts=3, on=Flaky, backoff=0.05, jitter=False)
    async def flaky(self, token: str, fails: int) -> list[Any]:
        """Raise Flaky on the first ``fails`` runs of ``token`` (counted in a log of its own)."""
        nonce = uuid.uuid4().hex[:12]
        self._note("run_start", token, nonce, retry=True)
        counts = f"{self.log}.flaky"
        with open(counts, "a") as f:  # noqa: ASYNC230
            f.write(token + "\n")
        with open(counts) as f:  # noqa: ASYNC230 - small: only flaky tokens
            runs = sum(1 for line in f if line.strip() == token)
        self._note("run_end", token, nonce, retry=True)
        if runs <= fails:
            raise Flaky(token)
        return [token, nonce, self.pid]

    @periodic(every=1)
    async def tick(self) -> None:
        self._note("tick", "tick", uuid.uuid4().hex[:12])
