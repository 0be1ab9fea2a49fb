"""Pools of local worker processes: supervision, recycling, health replacement and autoscaling.

Balancing needs nothing here: every worker of a service pulls from the same
consumer group, taking only what it can run, so an idle worker takes the
next call. A pool decides how many local workers there are and keeps them
alive and healthy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import psutil

from .config import WorkerOptions
from .errors import ConfigError, SpawnError
from .events import Event, EventKind
from .registry import WorkerInfo, read_workers
from .stats import LatencyHistogram

if TYPE_CHECKING:
    from .manager import ProcessManager, WorkerProcess

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
class PoolMetrics:
    """A snapshot of a pool."""

    workers: int
    busy: int
    """Calls running now."""
    backlog: int
    """Calls waiting or running in the service's stream (all hosts)."""
    calls: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    cpu: float
    """Sum over the pool's processes, in CPUs (1.0 = one core busy)."""
    rss: int
    """Sum of the resident memory of the pool's processes, bytes."""
    failed: int
    """Slots given up after too many crashes."""


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


class Pool(Generic[T]):
    """Local worker processes of one service, supervised; call through ``pool.proxy``.

    ``pool.proxy`` is typed as the service class. Attribute access on the pool
    itself forwards to the proxy too (``await pool.resize(img)``), untyped.
    """

    def __init__(
        self, manager: ProcessManager, path: str, proxy: T, *, service: str, settings: PoolSettings
    ) -> None:
        self.proxy = proxy
        self.service = service
        self.path = path
        self.settings = settings
        self._manager = manager
        self._options = settings.options
        self._target = settings.size
        self.workers: list[WorkerProcess] = []
        self._retiring: dict[str, str] = {}
        """Workers being stopped on purpose, with the reason (they are not restarted)."""
        self._crashes: deque[float] = deque()
        self.failed = 0
        self._closed = False
        self._cpu: dict[int, psutil.Process] = {}
        self._below_since: float | None = None
        self._resizing = anyio.Lock()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.proxy, name)

    @property
    def size(self) -> int:
        """How many workers the pool keeps running."""
        return self._target

    # -- starting and stopping workers -------------------------------------------------------

    async def _add_worker(self) -> WorkerProcess:
        worker = await self._manager._start_worker(
            self.path, dependencies=self.settings.dependencies, name=self.settings.name, options=self._options
        )
        self.workers.append(worker)
        self._manager._watch(worker, self._on_exit)
        if self._closed:  # closed while this one was starting: it goes too
            self._retiring[worker.worker_id] = "pool closed"
            await self._manager.stop_worker(worker, timeout=self._options.grace_period + 5)
        return worker

    async def _start(self, count: int) -> None:
        """Start ``count`` workers at once; raise the first SpawnError (the others keep running)."""
        errors: list[BaseException] = []

        async def one() -> None:
            try:
                await self._add_worker()
            except SpawnError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
        if errors:
            raise errors[0]

    async def _retire(self, worker: WorkerProcess, reason: str) -> None:
        """Drain one worker through SIGTERM (calls in flight finish); it is not restarted."""
        self._retiring[worker.worker_id] = reason
        await self._manager.stop_worker(worker, timeout=self._options.grace_period + 5)

    async def _replace(self, worker: WorkerProcess, kind: EventKind, detail: str) -> None:
        """Start the replacement first, then drain the old worker."""
        if worker.worker_id in self._retiring or self._closed:
            return
        self._retiring[worker.worker_id] = kind
        self._emit(kind, worker, detail)
        try:
            await self._add_worker()
        except SpawnError as exc:
            logger.error("pool %s: replacement for %s failed: %s", self.service, worker.worker_id, exc)
        await self._retire(worker, str(kind))

    def _on_exit(self, worker: WorkerProcess, code: int) -> None:
        """Called by the manager when a worker process exits."""
        if worker in self.workers:
            self.workers.remove(worker)
        self._cpu.pop(worker.pid, None)
        reason = self._retiring.pop(worker.worker_id, None)
        if reason is not None or self._closed:
            self._emit("stopped", worker, f"{reason or 'pool closed'}, exit code {code}")
            return
        self._emit("crashed", worker, f"exit code {code}")
        # It will not beat again: take it out of the registry now rather than at its TTL.
        self._manager._spawn_task(self._manager._clear_record, worker)
        self._after_crash(worker)

    def _after_crash(self, worker: WorkerProcess) -> None:
        """Restart after a backoff, unless the crashes within the window pass max_restarts."""
        if self.settings.restart is None or self._closed:
            self._target = max(0, self._target - 1)
            return
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - self.settings.restart.window:
            self._crashes.popleft()
        if len(self._crashes) > self.settings.restart.max_restarts:
            self.failed += 1
            self._target = max(0, self._target - 1)
            self._emit(
                "failed",
                worker,
                f"{len(self._crashes)} crashes within {self.settings.restart.window:g} s "
                f"(max_restarts {self.settings.restart.max_restarts}); not restarting",
            )
            return
        self._manager._spawn_task(
            self._restart_after, worker, self.settings.restart.delay(len(self._crashes))
        )

    async def _restart_after(self, crashed: WorkerProcess, delay: float) -> None:
        await anyio.sleep(delay)
        if self._closed:
            return
        try:
            worker = await self._add_worker()
        except SpawnError as exc:
            self._emit("crashed", crashed, f"restart failed: {exc.child_message}")
            self._after_crash(crashed)  # a restart that cannot start counts as another crash
            return
        self._emit("restarted", worker, f"replaces {crashed.worker_id} after {delay:.2f} s")

    def _emit(self, kind: EventKind, worker: WorkerProcess | None, detail: str = "") -> None:
        self._manager.events.emit(
            Event(
                kind,
                self.service,
                worker.worker_id if worker else None,
                worker.pid if worker else None,
                detail,
            )
        )

    # -- public control --------------------------------------------------------------------

    async def scale(self, n: int) -> None:
        """Run ``n`` workers: start new ones, or drain the least busy (their calls finish)."""
        if n < 0:
            raise ConfigError(f"a pool cannot have {n} workers")
        async with self._resizing:
            before = self._target
            self._target = n
            live = [w for w in self.workers if w.worker_id not in self._retiring]
            if n > len(live):
                try:
                    await self._start(n - len(live))
                except SpawnError:
                    self._target = len([w for w in self.workers if w.worker_id not in self._retiring])
                    raise
            elif n < len(live):
                infos = {i.worker_id: i for i in await self._infos()}
                ordered = sorted(
                    live, key=lambda w: infos[w.worker_id].in_flight if w.worker_id in infos else 0
                )
                async with anyio.create_task_group() as tg:
                    for worker in ordered[: len(live) - n]:
                        tg.start_soon(self._retire, worker, "scaled down")
            if before != n:
                self._emit("scaled", None, f"{before} -> {n} workers")

    async def _infos(self) -> list[WorkerInfo]:
        client = self._manager.client
        return await read_workers(
            client.redis, client.keys, self.service, [w.worker_id for w in self.workers]
        )

    async def metrics(self) -> PoolMetrics:
        """Workers, busy, backlog, calls, errors, latency percentiles, CPU and RSS of the pool."""
        infos = await self._infos()
        backlog = int(await self._manager.client.redis.xlen(self._manager.client.keys.calls(self.service)))
        latency = LatencyHistogram.merged(i.latency for i in infos)
        summary = latency.summary()
        cpu, rss = 0.0, 0
        for worker in self.workers:
            proc = self._process(worker)
            if proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                cpu += proc.cpu_percent(None) / 100
                rss += proc.memory_info().rss
        return PoolMetrics(
            workers=len(self.workers),
            busy=sum(i.in_flight for i in infos),
            backlog=backlog,
            calls=sum(i.calls for i in infos),
            errors=sum(i.errors for i in infos),
            p50_ms=summary["p50"],
            p95_ms=summary["p95"],
            p99_ms=summary["p99"],
            cpu=round(cpu, 3),
            rss=rss,
            failed=self.failed,
        )

    def _process(self, worker: WorkerProcess) -> psutil.Process | None:
        proc = self._cpu.get(worker.pid)
        if proc is None:
            try:
                proc = psutil.Process(worker.pid)
                proc.cpu_percent(None)  # the first reading only sets the baseline
            except psutil.Error:
                return None
            self._cpu[worker.pid] = proc
        return proc

    async def drain(self, timeout: float = 30.0) -> bool:
        """Wait until no call is waiting or running in the service's stream; False on timeout."""
        client = self._manager.client
        with anyio.move_on_after(timeout):
            # The state lives in Redis: poll it.
            while await client.redis.xlen(client.keys.calls(self.service)):  # noqa: ASYNC110
                await anyio.sleep(0.05)
            return True
        return False

    async def close(self, timeout: float = 30.0) -> None:
        """Stop every worker of the pool (SIGTERM: calls in flight finish, SIGKILL after ``timeout``)."""
        self._closed = True
        workers, self.workers = list(self.workers), []
        async with anyio.create_task_group() as tg:
            for worker in workers:
                self._retiring[worker.worker_id] = "pool closed"
                tg.start_soon(self._manager.stop_worker, worker, timeout)
        self._manager._forget_pool(self)

    # -- the monitor: recycling, health, autoscale -------------------------------------------

    async def _monitor(self, interval: float = 1.0) -> None:
        next_scale = time.monotonic() + (self.settings.autoscale.interval if self.settings.autoscale else 0)
        while not self._closed:
            await anyio.sleep(interval)
            try:
                await self._check_workers()
                if self.settings.autoscale is not None and time.monotonic() >= next_scale:
                    next_scale = time.monotonic() + self.settings.autoscale.interval
                    await self._autoscale(self.settings.autoscale)
            except Exception:
                logger.exception("pool %s: monitor step failed", self.service)

    async def _check_workers(self) -> None:
        infos = {i.worker_id: i for i in await self._infos()}
        now = time.time()
        for worker in list(self.workers):
            if worker.worker_id in self._retiring:
                continue
            info = infos.get(worker.worker_id)
            if info is not None and info.unhealthy_streak >= self.settings.unhealthy_threshold:
                self._manager._spawn_task(
                    self._replace, worker, "unhealthy",
                    f"{info.unhealthy_streak} failed health checks in a row: replacing it",
                )  # fmt: skip
            elif (
                info is not None
                and self.settings.recycle_after_calls
                and info.calls >= self.settings.recycle_after_calls
            ):
                self._manager._spawn_task(
                    self._replace,
                    worker,
                    "recycled",
                    f"served {info.calls} calls (limit {self.settings.recycle_after_calls})",
                )
            elif self.settings.max_lifetime and now - worker.started_at >= self.settings.max_lifetime:
                self._manager._spawn_task(
                    self._replace,
                    worker,
                    "recycled",
                    f"lived {now - worker.started_at:.0f} s (limit {self.settings.max_lifetime:g} s)",
                )
            elif self.settings.memory_limit:
                proc = self._process(worker)
                with contextlib.suppress(psutil.Error):
                    rss = proc.memory_info().rss if proc else 0
                    if rss >= self.settings.memory_limit:
                        limit = self.settings.memory_limit / 2**20
                        self._manager._spawn_task(
                            self._replace, worker, "recycled",
                            f"RSS {rss / 2**20:.0f} MiB over the limit of {limit:.0f} MiB",
                        )  # fmt: skip

    async def _autoscale(self, policy: AutoScale) -> None:
        live = [w for w in self.workers if w.worker_id not in self._retiring]
        n = len(live)
        if n == 0 or self._resizing.locked():
            return
        cpu = 0.0
        for worker in live:
            proc = self._process(worker)
            with contextlib.suppress(psutil.Error):
                cpu += proc.cpu_percent(None) / 100 if proc else 0.0
        backlog = int(await self._manager.client.redis.xlen(self._manager.client.keys.calls(self.service)))
        target_backlog = policy.target_backlog or self._options.concurrency
        cpu_per, backlog_per = cpu / n, backlog / n
        if (cpu_per > policy.target_cpu or backlog_per > target_backlog) and n < policy.max:
            self._below_since = None
            reason = f"cpu {cpu_per:.2f}/worker, backlog {backlog_per:.1f}/worker"
            logger.info("pool %s: scaling up (%s)", self.service, reason)
            await self.scale(n + 1)
            return
        # Shrink only if the others would still be below target without this worker.
        would_be_below = n > 1 and cpu / (n - 1) < policy.target_cpu and backlog / (n - 1) <= target_backlog
        if n > policy.min and would_be_below:
            now = time.monotonic()
            if self._below_since is None:
                self._below_since = now
            elif now - self._below_since >= policy.cooldown:
                self._below_since = None
                await self.scale(n - 1)
        else:
            self._below_since = None
