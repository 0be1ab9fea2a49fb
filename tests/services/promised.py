"""A test service for what the README promises of jobs and errors: a retry with a long backoff,
a method that always fails, a slow one and a typed one."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from datetime import date

import anyio

from titan_broker import process, public, retry


class Color(enum.Enum):
    RED = "red"


@dataclass(frozen=True)
class User:
    id: int
    name: str


@process(name="promised", version="1.0.0")
class Promised:
    @public
    @retry(attempts=3, on=ConnectionError, backoff=30, jitter=False)
    async def flaky(self) -> None:
        raise ConnectionError("down")

    @public
    async def boom(self) -> None:
        raise ValueError("boom")

    @public
    async def slow(self, seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    @public
    async def users(self) -> list[dict[str, object]]:
        return [{"id": 1, "name": "ann"}]

    @public
    async def color(self) -> str:
        return "purple"

    @public
    async def day(self, when: date) -> str:
        return when.isoformat()

    @public
    def slow_sync(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds
