"""What a pool decides, apart from doing it: restarts, recycling, autoscaling, and its settings.

Everything here is plain values and arithmetic (no processes, no Redis), so
each rule can be read, and tested, on its own; pool.py acts on the answers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .._config import WorkerOptions
from .._errors import ConfigError
from .._registry.records import WorkerInfo
from .events import EventKind

_DEFAULT_CONCURRENCY = WorkerOptions().concurrency


@dataclass(frozen=True)
class AutoScale:
    """Grow and shrink a pool between ``min`` and ``max`` workers.

    Every ``interval`` seconds the pool samples the CPU of its processes (a
    fraction of one core each) and the service backlog (calls waiting or
    running, per worker). It adds a worker when either is above its target,
    and removes one when both have stayed below for ``cooldown`` seconds
    (and would still be below with one worker fewer).
    """

    min: int = 1
    max: int = 4
    target_cpu: float = 0.7
    """A fraction of one CPU, 0 to 1 (0.7 is 70 %)."""
    target_backlog: int | None = None
    """Calls waiting or running per worker; default: the worker concurrency."""
    interval: float = 2.0
    cooldown: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.target_cpu <= 1:
            raise ConfigError(
                f"target_cpu is a fraction of one CPU between 0 and 1 (0.7 means 70 %), got {self.target_cpu}"
            )
        if self.min < 1 or self.max < self.min:
            raise ConfigError(f"AutoScale needs 1 <= min <= max, got min={self.min}, max={self.max}")
        if self.interval <= 0 or self.cooldown < 0:
            raise ConfigError("AutoScale interval must be positive and cooldown not negative")
        if self.target_backlog is not None and self.target_backlog < 1:
            raise ConfigError(f"target_backlog must be at least 1, got {self.target_backlog}")


@dataclass(frozen=True)
class RestartPolicy:
    """Restart crashed workers after ``backoff`` seconds, doubling each time, up to ``max_backoff``.

    More than ``max_restarts`` crashes within ``window`` seconds stop the
    restarts: the pool marks the slot failed.
    """

    max_restarts: int = 5
    window: float = 60.0
    backoff: float = 0.5
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window <= 0 or self.backoff < 0 or self.max_backoff < self.backoff:
            raise ConfigError(f"invalid RestartPolicy: {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (1-based) within the window."""
        return float(min(self.backoff * 2 ** max(0, attempt - 1), self.max_backoff))


@dataclass(frozen=True)
class PoolSettings:
    """How a pool runs its workers (see ProcessManager.pool)."""

    size: int = 1
    autoscale: AutoScale | None = None
    restart: RestartPolicy | None = field(default_factory=RestartPolicy)
    recycle_after_calls: int | None = None
    max_lifetime: float | None = None
    memory_limit: int | None = None
    unhealthy_threshold: int = 3
    dependencies: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    options: WorkerOptions = field(default_factory=WorkerOptions)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"a pool needs at least 1 worker, got size={self.size}")
        scale = self.autoscale
        if scale is not None and not scale.min <= self.size <= scale.max:
            raise ConfigError(f"size={self.size} is outside autoscale min={scale.min}, max={scale.max}")


def worker_options(options: WorkerOptions | None, concurrency: int | None) -> WorkerOptions:
    """The options a pool's workers get: the ``concurrency`` keyword, over ``options``, over the defaults.

    Both given and different is a ConfigError, unless ``options`` left
    concurrency at its default (then the keyword says what was meant).
    """
    base = options or WorkerOptions()
    if concurrency is None or concurrency == base.concurrency:
        return base
    if base.concurrency != _DEFAULT_CONCURRENCY:
        raise ConfigError(
            f"concurrency={concurrency} conflicts with "
            f"options=WorkerOptions(concurrency={base.concurrency}): give it in one place"
        )
    return replace(base, concurrency=concurrency)


class CrashHistory:
    """The crashes of a pool within its restart window: restart after a backoff, or give up."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._crashes: deque[float] = deque()

    def __len__(self) -> int:
        return len(self._crashes)

    def record(self, now: float) -> float | None:
        """Count a crash at ``now`` (monotonic); the delay before its restart, None past max_restarts."""
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - self.policy.window:
            self._crashes.popleft()
        if len(self._crashes) > self.policy.max_restarts:
            return None
        return self.policy.delay(len(self._crashes))


def replacement_reason(
    settings: PoolSettings, record: WorkerInfo | None, age: float, rss: int
) -> tuple[EventKind, str] | None:
    """Why a worker should be replaced (its replacement started first), or None while it is fine.

    ``record`` is its registry record (None when it is not readable now),
    ``age`` the seconds since it started, ``rss`` its resident memory.
    """
    if record is not None and record.unhealthy_streak >= settings.unhealthy_threshold:
        return "unhealthy", f"{record.unhealthy_streak} failed health checks in a row: replacing it"
    limit = settings.recycle_after_calls
    if record is not None and limit and record.calls >= limit:
        return "recycled", f"served {record.calls} calls (limit {limit})"
    if settings.max_lifetime and age >= settings.max_lifetime:
        return "recycled", f"lived {age:.0f} s (limit {settings.max_lifetime:g} s)"
    if settings.memory_limit and rss >= settings.memory_limit:
        mib = 2**20
        return "recycled", f"RSS {rss / mib:.0f} MiB over the limit of {settings.memory_limit / mib:.0f} MiB"
    return None


class Autoscaler:
    """Decides the size of an autoscaled pool from its CPU and backlog, remembering how long it idled."""

    def __init__(self, policy: AutoScale, concurrency: int) -> None:
        self.policy = policy
        self.target_backlog = policy.target_backlog or concurrency
        self._below_since: float | None = None

    def decide(self, n: int, cpu: float, backlog: int, now: float) -> int | None:
        """The size to scale ``n`` live workers to, or None to stay.

        ``cpu`` is the pool's total in CPUs, ``backlog`` the calls waiting or
        running in the service's stream, ``now`` a monotonic time. One more
        worker when either is above target; one fewer once both have stayed
        below for ``cooldown`` and would stay below without it.
        """
        policy = self.policy
        if n == 0:
            return None
        cpu_per, backlog_per = cpu / n, backlog / n
        if (cpu_per > policy.target_cpu or backlog_per > self.target_backlog) and n < policy.max:
            self._below_since = None
            return n + 1
        would_be_below = (
            n > 1 and cpu / (n - 1) < policy.target_cpu and backlog / (n - 1) <= self.target_backlog
        )
        if not (n > policy.min and would_be_below):
            self._below_since = None
            return None
        if self._below_since is None:
            self._below_since = now
        elif now - self._below_since >= policy.cooldown:
            self._below_since = None
            return n - 1
        return None
