"""A test service for edge cases of the worker: a blocked event loop, bad input, failures outside
the method, streams nobody reads, blocking threads. Each method that matters notes every run in the
``log`` file given to init (one line per run), so a test can count how often it RAN."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import anyio

from titan_broker import cache, process, public


@process(name="edge", version="0.1.0")
class Edge:
    async def init(self, log: str | None = None) -> None:
        self.log = log

    def _note(self, line: str) -> None:
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{line} {os.getpid()}\n")

    @public
    async def block(self, n: int, seconds: float) -> dict[str, int]:
        """Block the whole event loop (a blocking library called by mistake from async code)."""
        self._note(f"block {n}")
        time.sleep(seconds)  # noqa: ASYNC251 - blocking the loop is the point
        return {"n": n, "pid": os.getpid()}

    @public
    async def nap(self, n: int, seconds: float) -> dict[str, int]:
        """Sleep without blocking the loop; notes the start and the end of each run."""
        self._note(f"nap {n}")
        await anyio.sleep(seconds)
        self._note(f"napped {n}")
        return {"n": n, "pid": os.getpid()}

    @public
    async def text(self, s: str) -> int:
        self._note("text")
        return len(s)

    @public
    async def echo(self, value: object) -> object:
        return value

    @public
    async def ping(self) -> int:
        return os.getpid()

    @public
    async def fail(self) -> None:
        raise ValueError("edge failure on purpose")

    @public
    def hang(self, seconds: float) -> str:
        """A plain def: runs in a thread and blocks it."""
        self._note("hang")
        time.sleep(seconds)
        return "woke"

    @public
    async def numbers(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @public
    @cache(ttl=60, scope="service", invalidated_by=["update"])
    async def get(self, k: str) -> str:
        self._note(f"get {k}")
        return f"value of {k}"

    @public
    async def update(self, k: str) -> str:
        self._note(f"update {k}")
        return f"updated {k}"
