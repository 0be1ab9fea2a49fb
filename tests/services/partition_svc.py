"""A test service for the partition test: calls that run until the test opens their gate.

``hold(i)`` notes "start i pid" in the run log, waits until the file
``<gates>/<i>`` exists, notes "stop i pid" (also when it is cancelled) and
returns ``[i, pid]``. The test decides when each call ends, so a worker can be
made to hold calls across a network cut for exactly as long as needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from titan_broker import process, public


@process(name="partition", version="0.1.0")
class Partition:
    async def init(self, gates: str, log: str) -> None:
        self.gates = Path(gates)
        self.log = log

    def _note(self, event: str, i: int) -> None:
        with open(self.log, "a") as f:  # a tiny append, also from a `finally` under cancellation
            f.write(f"{event} {i} {os.getpid()}\n")

    @public
    async def hold(self, i: int) -> list[int]:
        self._note("start", i)
        try:
            with anyio.fail_after(60):  # a gate never opened must not hold a worker forever
                while not await anyio.Path(self.gates / str(i)).exists():  # noqa: ASYNC110 - a file
                    await anyio.sleep(0.02)
        finally:
            self._note("stop", i)
        return [i, os.getpid()]
