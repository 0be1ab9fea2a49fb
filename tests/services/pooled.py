"""A test service for pools: slow and CPU-bound calls, memory hogging, exits, per-process sickness."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import anyio

from titan_broker import Health, health_check, process, public


@process(name="pooled", version="0.1.0")
class Pooled:
    async def init(self, sick_dir: str | None = None) -> None:
        self.sick_dir = sick_dir
        self.hoard: list[bytearray] = []

    @public
    async def sleep(self, seconds: float) -> int:
        await anyio.sleep(seconds)
        return os.getpid()

    @public
    def spin(self, seconds: float) -> int:
        """Burn CPU for ``seconds`` (in a worker thread, as CPU-bound methods should)."""
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            n += 1
        return os.getpid()

    @public
    async def hog(self, mb: int) -> int:
        block = bytearray(mb * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it counts in RSS
        self.hoard.append(block)
        return os.getpid()

    @public
    async def exit_soon(self, code: int = 3) -> int:
        """Answer, then exit with ``code`` as if the process had crashed."""
        asyncio.get_running_loop().call_later(0.2, os._exit, code)
        return os.getpid()

    @health_check
    async def health(self) -> Health:
        """Unhealthy when <sick_dir>/<pid> exists; hangs or raises when <pid>.hang or <pid>.raise does."""
        flag = Path(self.sick_dir or "/nonexistent") / str(os.getpid())
        if flag.with_suffix(".hang").exists():
            await anyio.sleep(3600)
        if flag.with_suffix(".raise").exists():
            raise ConnectionError("the database is gone")
        sick = flag.exists()
        return Health("unhealthy" if sick else "healthy", checks={"sick_flag": sick})
