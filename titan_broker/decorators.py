"""The decorators that turn a class into a service: @process, @public, @health_check, @on_shutdown."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from .config import check_name

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


def process(*, name: str, version: str = "0.0.0", description: str = "") -> Callable[[C], C]:
    """Mark a class as a service called ``name``; a service file holds exactly one.

    Raises ConfigError when the name cannot be used in Redis key names.
    """
    check_name(name, "@process name")

    def mark(cls: C) -> C:
        setattr(cls, PROCESS_ATTR, ProcessInfo(name, version, description or (cls.__doc__ or "")))
        return cls

    return mark


def _mark(attr: str, fn: Any) -> Any:
    def mark(f: F) -> F:
        setattr(f, attr, True)
        return f

    return mark if fn is None else mark(fn)


@overload
def public(fn: F, /) -> F: ...
@overload
def public() -> Callable[[F], F]: ...
def public(fn: Any = None, /) -> Any:
    """Expose a method to callers. ``async def`` runs on the worker's loop; plain ``def`` in a thread.

    Usable as ``@public`` or ``@public()``. Only @public methods can be called.
    """
    return _mark(PUBLIC_ATTR, fn)


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
