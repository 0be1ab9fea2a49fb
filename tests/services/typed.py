"""A test service whose methods take and return every rich type the wire carries, in one dataclass."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum, IntEnum, StrEnum
from typing import Any, Literal, NamedTuple, TypedDict
from uuid import UUID

from titan_broker import cache, process, public


class Color(Enum):
    RED = "red"
    GREEN = "green"


class Level(IntEnum):
    LOW = 1
    HIGH = 2


class Mode(StrEnum):
    FAST = "fast"
    SAFE = "safe"


class Pair(NamedTuple):
    left: int
    right: str


class Row(TypedDict):
    name: str
    score: Decimal


@dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclass(frozen=True)
class Size:
    """A map as Point is: a union of the two is told apart by the fields alone."""

    w: int
    h: int


@dataclass
class Everything:
    """One field of every rich type the wire carries, containers nested in containers included."""

    naive: datetime
    aware: datetime
    day: date
    clock: time
    span: timedelta
    ident: UUID
    amount: Decimal
    color: Color
    level: Level
    mode: Mode
    blob: bytes
    tags: set[str]
    frozen: frozenset[int]
    pair: tuple[int, str]
    named: Pair
    row: Row
    kind: Literal["a", "b"]
    maybe: int | None
    points: list[Point]
    by_day: dict[str, list[tuple[date, Decimal]]]
    huge: int


def type_names(value: Any) -> dict[str, str]:
    """The type of each field of a dataclass as the worker sees it (nested ones too, one level)."""
    seen = {f.name: type(getattr(value, f.name)).__name__ for f in fields(value)}
    seen["points[0]"] = type(value.points[0]).__name__
    day, amount = next(iter(value.by_day.values()))[0]
    seen["by_day[][0]"] = f"{type(day).__name__},{type(amount).__name__}"
    seen["row.score"] = type(value.row["score"]).__name__
    return seen


@process(name="typed", version="1.0.0")
class Typed:
    async def init(self) -> None:
        self.runs = 0
        self.lock = threading.Lock()

    def _ran(self) -> None:
        with self.lock:
            self.runs += 1

    @public
    async def echo(self, value: Everything) -> Everything:
        self._ran()
        return value

    @public
    def echo_sync(self, value: Everything) -> Everything:
        self._ran()
        return value

    @public
    async def repeat(self, value: Everything, n: int) -> AsyncIterator[Everything]:
        self._ran()
        for _ in range(n):
            yield value

    @public
    async def seen(self, value: Everything) -> dict[str, str]:
        """What the worker received: the type of each field."""
        self._ran()
        return type_names(value)

    @public
    async def top(
        self,
        when: datetime,
        ident: UUID,
        amount: Decimal,
        color: Color,
        tags: frozenset[str],
        pair: tuple[int, str],
        *rest: Point,
        maybe: Point | None = None,
        **more: date,
    ) -> list[str]:
        """Top-level parameters of rich types (positional, *args, keyword-only, **kwargs)."""
        self._ran()
        values = [when, ident, amount, color, tags, pair, *rest, maybe, *more.values()]
        return [type(v).__name__ for v in values]

    @public
    async def either(self, value: str | datetime) -> str | datetime:
        """A union msgspec cannot decode by itself (two string-like members)."""
        self._ran()
        return value

    @public
    async def shift(self, when: datetime, by: timedelta) -> datetime:
        self._ran()
        return when + by

    @public
    async def blob_or_text(self, value: bytes | str) -> list[str]:
        self._ran()
        return [type(value).__name__]

    @public
    async def shapes(self, value: list[Point | Size | Pair]) -> list[str]:
        self._ran()
        return [type(v).__name__ for v in value]

    @public
    async def bad_result(self) -> Point:
        self._ran()
        return Point("one", 2)  # type: ignore[arg-type]  # the error under test

    @public
    async def bad_nested_result(self) -> Everything:
        self._ran()
        return {"naive": 1.5}  # type: ignore[return-value]  # the error under test

    @public
    async def bad_item(self) -> AsyncIterator[Point]:
        self._ran()
        yield Point(1, 2)
        yield {"x": 3}  # type: ignore[misc]  # the error under test

    @public
    @cache(ttl=60, scope="service")
    async def cached_in_redis(self, day: date) -> list[Point]:
        self._ran()
        return [Point(day.month, day.day)]

    @public
    @cache(ttl=60)
    async def cached_here(self, day: date) -> list[Point]:
        self._ran()
        return [Point(day.month, day.day)]

    @public
    async def runs_so_far(self) -> int:
        return self.runs
