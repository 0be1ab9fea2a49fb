"""The decorators that turn a class into a service, and those that add a feature to a method.

@process marks the class; @public, @health_check and @on_shutdown mark its
methods. @cache, @rate_limit, @metric and @trace each record an options
object in the method's feature map (``FEATURES_ATTR``, keyed by the options'
``feature`` name); the worker turns each into a call middleware
(``titan_worker.middleware``). A new feature is an options class, its
decorator here, and its middleware module.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, overload

from .config import check_name
from .errors import ConfigError

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])

PROCESS_ATTR = "__titan_process__"
PUBLIC_ATTR = "__titan_public__"
HEALTH_ATTR = "__titan_health_check__"
SHUTDOWN_ATTR = "__titan_on_shutdown__"
FEATURES_ATTR = "__titan_features__"


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


def _feature(options: Any, fn: Any = None) -> Any:
    """Record ``options`` in the method's feature map, under ``options.feature``."""

    def mark(f: F) -> F:
        features = dict(getattr(f, FEATURES_ATTR, {}))
        features[options.feature] = options
        setattr(f, FEATURES_ATTR, features)
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


Scope = Literal["worker", "service"]


@dataclass(frozen=True)
class CacheOptions:
    """What @cache recorded on a method."""

    feature: ClassVar[str] = "cache"

    ttl: float
    scope: Scope = "worker"
    maxsize: int = 1024
    key: Callable[..., Any] | None = None
    invalidated_by: tuple[str, ...] = ()


def cache(
    *,
    ttl: float,
    scope: Scope = "worker",
    maxsize: int = 1024,
    key: Callable[..., Any] | None = None,
    invalidated_by: Sequence[str] = (),
) -> Callable[[F], F]:
    """Cache a method's results per arguments for ``ttl`` seconds; errors are not cached.

    ``scope="worker"`` keeps up to ``maxsize`` results in each worker;
    ``scope="service"`` shares them among all workers through Redis. ``key``
    is a function of the method's arguments giving the cache key (default:
    all of them). A successful call of any method named in
    ``invalidated_by`` empties this cache in every worker, as does
    ``Client.invalidate_cache``. Raises ConfigError for a bad option.
    """
    if ttl <= 0 or maxsize < 1 or scope not in ("worker", "service"):
        raise ConfigError(f"@cache needs ttl > 0, maxsize >= 1 and scope 'worker' or 'service' (ttl={ttl})")
    options = CacheOptions(ttl, scope, maxsize, key, tuple(invalidated_by))
    mark: Callable[[F], F] = _feature(options)
    return mark


@dataclass(frozen=True)
class RateLimitOptions:
    """What @rate_limit recorded on a method."""

    feature: ClassVar[str] = "rate_limit"

    rps: float
    burst: int
    scope: Scope = "service"
    key: Callable[..., Any] | None = None


def rate_limit(
    *, rps: float, burst: int | None = None, scope: Scope = "service", key: Callable[..., Any] | None = None
) -> Callable[[F], F]:
    """Admit at most ``rps`` calls a second (a token bucket holding ``burst`` tokens).

    ``scope="service"`` counts across all workers atomically in Redis;
    ``scope="worker"`` in each worker. ``key``, a function of the arguments,
    gives each value its own bucket (per user, say). A refused call fails at
    once with RateLimited, carrying ``retry_after``; it is never queued.
    """
    if rps <= 0 or scope not in ("worker", "service"):
        raise ConfigError(f"@rate_limit needs rps > 0 and scope 'worker' or 'service', got rps={rps}")
    size = burst if burst is not None else max(1, math.ceil(rps))
    _check_limit("burst", size)
    mark: Callable[[F], F] = _feature(RateLimitOptions(rps, size, scope, key))
    return mark


@dataclass(frozen=True)
class MetricOptions:
    """What @metric recorded on a method."""

    feature: ClassVar[str] = "metric"

    name: str | None = None


@overload
def metric(fn: F, /) -> F: ...
@overload
def metric(*, name: str | None = None) -> Callable[[F], F]: ...
def metric(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Count calls and errors and time them (Prometheus, and a summary in the registry).

    ``name`` replaces the method name in the metrics' ``method`` label.
    """
    return _feature(MetricOptions(name), fn)


@dataclass(frozen=True)
class TraceOptions:
    """What @trace recorded on a method."""

    feature: ClassVar[str] = "trace"

    name: str | None = None


@overload
def trace(fn: F, /) -> F: ...
@overload
def trace(*, name: str | None = None) -> Callable[[F], F]: ...
def trace(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Run each call in an OpenTelemetry span, a child of the caller's span when it has one.

    Does nothing when OpenTelemetry is not configured (only the API installed).
    """
    return _feature(TraceOptions(name), fn)
