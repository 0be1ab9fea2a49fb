"""The decorators that turn a class into a service: @process, @public, @health_check, @on_shutdown."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from .config import check_name
from .errors import ConfigError

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])

PROCESS_ATTR = "__titan_process__"
PUBLIC_ATTR = "__titan_public__"
HEALTH_ATTR = "__titan_health_check__"
SHUTDOWN_ATTR = "__titan_on_shutdown__"


@dataclass(frozen=True)
class ProcessInfo:
    """What @process recorded on a class."""

    name: str
    version: str
    description: str = ""
    max_deliveries: int = 3
    max_backlog: int = 10_000


def process(
    *,
    name: str,
    version: str = "0.0.0",
    description: str = "",
    max_deliveries: int = 3,
    max_backlog: int = 10_000,
) -> Callable[[C], C]:
    """Mark a class as a service called ``name``; a service file holds exactly one.

    ``max_deliveries``: a call delivered more often than this (its workers kept
    dying on it) goes to the dead letters. ``max_backlog``: calls waiting beyond
    this are refused with BacklogFull. Raises ConfigError for a name that cannot
    be used in Redis keys or limits below 1.
    """
    check_name(name, "@process name")
    _check_limit("max_deliveries", max_deliveries)
    _check_limit("max_backlog", max_backlog)

    def mark(cls: C) -> C:
        info = ProcessInfo(name, version, description or (cls.__doc__ or ""), max_deliveries, max_backlog)
        setattr(cls, PROCESS_ATTR, info)
        return cls

    return mark


def _check_limit(what: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{what} must be a whole number of at least 1, got {value!r}")


@dataclass(frozen=True)
class PublicOptions:
    """What @public recorded on a method."""

    max_deliveries: int | None = None


def _mark(attr: str, fn: Any, value: Any = True) -> Any:
    def mark(f: F) -> F:
        setattr(f, attr, value)
        return f

    return mark if fn is None else mark(fn)


@overload
def public(fn: F, /) -> F: ...
@overload
def public(*, max_deliveries: int | None = None) -> Callable[[F], F]: ...
def public(fn: Any = None, /, *, max_deliveries: int | None = None) -> Any:
    """Expose a method to callers. ``async def`` runs on the worker's loop; plain ``def`` in a thread.

    Usable as ``@public`` or ``@public(max_deliveries=1)`` (overrides the
    service's limit, e.g. 1 for a call that must never run twice). Only
    @public methods can be called.
    """
    _check_limit("max_deliveries", max_deliveries)
    return _mark(PUBLIC_ATTR, fn, PublicOptions(max_deliveries))


@overload
def health_check(fn: F, /) -> F: ...
@overload
def health_check() -> Callable[[F], F]: ...
def health_check(fn: Any = None, /) -> Any:
    """Mark the method the worker runs to report its Health (at most one per class)."""
    return _mark(HEALTH_ATTR, fn)


@overload
def on_shutdown(fn: F, /) -> F: ...
@overload
def on_shutdown() -> Callable[[F], F]: ...
def on_shutdown(fn: Any = None, /) -> Any:
    """Mark a method the worker awaits on shutdown, after calls in flight have finished."""
    return _mark(SHUTDOWN_ATTR, fn)


class HealthStatus(enum.StrEnum):
    """How a worker reports itself."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class Health:
    """The result of a @health_check: an overall status, named checks and free-form details."""

    status: HealthStatus | str = HealthStatus.HEALTHY
    checks: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and msgpack-friendly form."""
        return {
            "status": str(HealthStatus(self.status)),
            "checks": dict(self.checks),
            "details": dict(self.details),
        }
