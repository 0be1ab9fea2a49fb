"""The decorators that turn a class into a service, and those that add a feature to a method.

@process marks the class; @public, @health_check and @on_shutdown mark its
methods. @cache, @rate_limit, @metric, @trace, @retry and @periodic each record an options
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
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, overload

if TYPE_CHECKING:
    from croniter import croniter

from .._config import check_name
from .._errors import ConfigError
from .._wire.keys import check_shards

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
    shards: int = 1


def process(
    *,
    name: str,
    version: str = "0.0.0",
    description: str = "",
    max_deliveries: int = 3,
    max_backlog: int = 10_000,
    shards: int = 1,
) -> Callable[[C], C]:
    """Mark a class as a service called ``name``; a service file holds exactly one.

    ``max_deliveries``: a call delivered more often than this (its workers kept
    dying on it) goes to the dead letters. ``max_backlog``: calls waiting beyond
    this are refused with BacklogFull (a sharded service: an even share per shard). ``shards``: the slots the
    service's calls are spread over, so that one busy service uses several
    primaries of a Redis Cluster (``titan-worker run --shards`` overrides it;
    every worker of the service must use the same count). Raises ConfigError
    for a name that cannot be used in Redis keys or limits below 1.
    """
    check_name(name, "@process name")
    _check_limit("max_deliveries", max_deliveries)
    _check_limit("max_backlog", max_backlog)
    check_shards(shards, "@process shards")

    def mark(cls: C) -> C:
        info = ProcessInfo(
            name, version, description or (cls.__doc__ or ""), max_deliveries, max_backlog, shards
        )
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


@dataclass(frozen=True)
class RetryOptions:
    """What @retry recorded on a method."""

    feature: ClassVar[str] = "retry"

    attempts: int
    on: tuple[type[BaseException], ...]
    backoff: float
    max_backoff: float
    jitter: bool

    def delay(self, attempt: int, draw: float) -> float:
        """Seconds before the run after ``attempt`` (1-based): ``backoff`` doubled each time, at most
        ``max_backoff``; with jitter, a random part of it (``draw`` in [0, 1)), never below half."""
        delay = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return delay * (0.5 + draw / 2) if self.jitter else delay


def retry(
    *,
    attempts: int = 3,
    on: type[BaseException] | Sequence[type[BaseException]] = (Exception,),
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    jitter: bool = True,
) -> Callable[[F], F]:
    """Run the method again later when it raises one of ``on``, up to ``attempts`` runs in all.

    A retry is not a loop in the worker: the call goes back to the service's
    queue, due after a backoff (``backoff`` seconds doubled each time, at most
    ``max_backoff``, a random part of it with ``jitter``), so any worker may
    run it, and it keeps its deadline. The caller (or the job) sees the last
    error when the attempts are spent. Separate from redelivery after a
    worker's crash (``max_deliveries``).
    """
    types = (on,) if isinstance(on, type) else tuple(on)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise ConfigError(f"@retry(on=...) takes exception classes, got {on!r}")
    if not isinstance(attempts, int) or attempts < 2:
        raise ConfigError(
            f"@retry needs attempts >= 2 (the first run and at least one more), got {attempts!r}"
        )
    if backoff < 0 or max_backoff < backoff:
        raise ConfigError(f"@retry needs 0 <= backoff <= max_backoff, got {backoff} and {max_backoff}")
    mark: Callable[[F], F] = _feature(RetryOptions(attempts, types, backoff, max_backoff, jitter))
    return mark


@dataclass(frozen=True)
class PeriodicOptions:
    """What @periodic recorded on a method: when its ticks fall (in Redis's clock, UTC)."""

    feature: ClassVar[str] = "periodic"

    every: float | None = None
    cron: str | None = None
    result_ttl: float = 86_400.0

    def tick_at_or_before(self, now_ms: int) -> int:
        """The latest tick at or before ``now_ms`` (ms since the epoch)."""
        if self.every is not None:
            step = int(self.every * 1000)
            return now_ms - now_ms % step
        return int(_cron(self.cron, now_ms + 1).get_prev(float) * 1000)

    def tick_after(self, tick_ms: int) -> int:
        """The next tick after ``tick_ms``."""
        if self.every is not None:
            return tick_ms + int(self.every * 1000)
        return int(_cron(self.cron, tick_ms).get_next(float) * 1000)

    def describe(self) -> str:
        return f"every {self.every:g} s" if self.every is not None else f"cron {self.cron}"


def _cron(expression: str | None, at_ms: int) -> croniter:
    assert expression is not None, "a cron schedule has its expression"
    from croniter import croniter

    return croniter(expression, datetime.fromtimestamp(at_ms / 1000, tz=UTC))


def periodic(
    *, every: float | None = None, cron: str | None = None, result_ttl: float = 86_400.0
) -> Callable[[F], F]:
    """Run the method on a schedule: ``every`` seconds, or at the ticks of a ``cron`` expression (UTC).

    With any number of workers on any number of hosts each tick runs once:
    the worker that reaches it first queues the run as a job (``titan jobs``
    shows it, kept ``result_ttl`` seconds), and a worker that dies running it
    leaves it to another while its tick is the latest. Ticks missed while no
    worker was alive are not made up: the next tick runs. While a tick's run
    has not started, the next ticks are skipped (runs never pile up); a run is
    not cut at the next tick. A schedule that cannot tick (a cron expression
    that never matches, ``every`` not a number of seconds of at least 0.1)
    raises ConfigError naming the method.
    The method takes no required arguments and is also @public (callers may
    run it now).
    """
    if (every is None) == (cron is None):
        raise ConfigError("@periodic takes one of every=<seconds> or cron='<expression>'")

    def mark(fn: F) -> F:
        # Checked here, where the method is known, so that the error names it: a schedule that
        # cannot tick would otherwise only show as a worker that never runs the method.
        options = _checked_schedule(getattr(fn, "__qualname__", repr(fn)), every, cron, result_ttl)
        if not getattr(fn, PUBLIC_ATTR, False):
            setattr(fn, PUBLIC_ATTR, PublicOptions())
        marked: F = _feature(options)(fn)
        return marked

    return mark


def _checked_schedule(where: str, every: Any, cron: Any, result_ttl: Any) -> PeriodicOptions:
    """The options of ``@periodic`` on ``where``, or ConfigError naming it when they cannot tick."""
    if every is not None and not _finite_at_least(every, 0.1):
        raise ConfigError(
            f"{where}: @periodic(every=...) needs a number of seconds, at least 0.1, got {every!r}"
        )
    if not _finite_at_least(result_ttl, 0.001):
        raise ConfigError(
            f"{where}: @periodic(result_ttl=...) needs a positive number of seconds, got {result_ttl!r}"
        )
    if cron is not None:
        from croniter import croniter  # imported by the services that have a cron schedule only

        if not isinstance(cron, str):
            raise ConfigError(f"{where}: @periodic(cron=...) takes a cron expression, got {cron!r}")
        try:
            _cron(cron, 0)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: @periodic(cron={cron!r}) is not a cron expression: {exc}") from exc
        # An expression that never matches (30 February) has no tick to compute: refuse it here
        # rather than let every tick of the worker fail on it.
        now = datetime.now(UTC)
        try:
            croniter(cron, now).get_next(float)
            croniter(cron, now).get_prev(float)
        except ValueError as exc:
            raise ConfigError(f"{where}: @periodic(cron={cron!r}) never matches a date ({exc})") from exc
    return PeriodicOptions(float(every) if every is not None else None, cron, float(result_ttl))


def _finite_at_least(value: Any, least: float) -> bool:
    """Whether ``value`` is a real number (not a bool, NaN or infinity) of at least ``least``."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= least
    )
