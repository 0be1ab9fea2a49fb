"""A test service for fault tests: work that takes a while, and calls that kill their worker."""

from __future__ import annotations

import os
import signal

import anyio

from titan_broker import process, public


@process(name="chaos", version="0.1.0", max_backlog=100_000)
class Chaos:
    async def init(self, log: str | None = None) -> None:
        self.log = log

    @public
    async def work(self, i: int, ms: float = 0.0, attempt: int = 0) -> list[int]:
        """Return [i * 2, pid] after ``ms`` milliseconds; log each run ("i pid attempt") when asked to.

        ``attempt`` tells a caller's retries of call ``i`` (new requests) from a rerun of one request.
        """
        if self.log:
            with open(self.log, "a") as f:  # noqa: ASYNC230 - a tiny append in a test service
                f.write(f"{i} {os.getpid()} {attempt}\n")
        await anyio.sleep(ms / 1000)
        return [i * 2, os.getpid()]

    @public(max_deliveries=1)
    async def once(self, path: str, ms: float) -> int:
        """A call that must never run twice: note the run (the pid) in ``path``, then take ``ms``."""
        with open(path, "a") as f:  # noqa: ASYNC230
            f.write(f"{os.getpid()}\n")
        await anyio.sleep(ms / 1000)
        return os.getpid()

    @public(max_deliveries=2)
    async def crash(self) -> None:
        """Kill this worker, as an OOM kill would."""
        os.kill(os.getpid(), signal.SIGKILL)

    @public(max_deliveries=2)
    async def crash_unless(self, path: str) -> str:
        """Kill this worker unless ``path`` exists; then note the run in it."""
        if not os.path.exists(path):  # noqa: ASYNC240
            os.kill(os.getpid(), signal.SIGKILL)
        with open(path, "a") as f:  # noqa: ASYNC230
            f.write("ran\n")
        return "ok"
