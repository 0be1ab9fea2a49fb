"""A test service that tells which modules its worker process has imported."""

from __future__ import annotations

import sys
import threading

from titan_broker import process, public


@process(name="probe", version="0.1.0")
class Probe:
    @public
    async def modules(self) -> list[str]:
        """The names of the modules imported in this process."""
        return sorted(sys.modules)

    @public
    async def threads(self) -> list[str]:
        """The names of the threads running in this process."""
        return sorted(t.name for t in threading.enumerate())

    @public
    async def add(self, a: int, b: int) -> int:
        return a + b
