"""Pools of local worker processes: supervision, recycling, health replacement and autoscaling.

Balancing needs nothing here: every worker of a service pulls from the same
consumer group, taking only what it can run, so an idle worker takes the
next call. A pool decides how many local workers there are and keeps them
alive and healthy. The rules live in supervision.py; a Supervisor
(supervisor.py) keeps the processes running; the Pool is what its user
controls (scale, metrics, drain, close) plus the monitor that recycles,
replaces and autoscales.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio

from .._calling.breaker import CircuitBreaker
from .._calling.client import ServiceProxy
from .._errors import ConfigError, SpawnError
from .._redis import REDIS_ERRORS
from .._registry import backlog
from .._registry.latency import LatencyHistogram
from .launcher import WorkerProcess
from .policies import AutoScale, Autoscaler, PoolSettings, RestartPolicy, replacement_reason
from .supervisor import PoolContext, Supervisor

__all__ = ["AutoScale", "Pool", "PoolContext", "PoolMetrics", "PoolSettings", "RestartPolicy", "start_pool"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


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


async def start_pool(
    context: PoolContext,
    pools: list[Pool[Any]],
    path: str,
    settings: PoolSettings,
    *,
    expected: str | None = None,
    startup_timeout: float | None = None,
    breaker: CircuitBreaker | None = None,
    cls: type | None = None,
) -> Pool[Any]:
    """Start a pool of ``settings.size`` workers of the service in ``path``, whole or not at all.

    The first worker tells what the service is called and what it offers;
    when ``expected`` is given and it serves another service, it is stopped
    and this is a ConfigError. ``pools`` is the owner's list of open pools:
    the pool is in it from its first worker until it closes. The proxy decodes
    results into ``cls``'s annotations.
    """
    first = await context.launcher.start(
        path,
        dependencies=settings.dependencies,
        name=settings.name,
        options=settings.options,
        startup_timeout=startup_timeout,
    )
    if expected is not None and expected != first.service:
        await first.stop(grace=5.0)
        raise ConfigError(f"{path} serves {first.service!r} but the class passed is {expected!r}")
    supervisor = Supervisor(context, path, first.service, settings, startup_timeout)
    proxy = ServiceProxy(
        context.client, first.service, methods=first.methods, timeout=None, breaker=breaker,
        streaming=first.streaming, cls=cls,
    )  # fmt: skip
    pool: Pool[Any] = Pool(supervisor, proxy, pools)
    pools.append(pool)
    supervisor.adopt(first)
    if settings.size > 1:
        try:
            await supervisor.start(settings.size - 1)
        except BaseException:
            await pool.close()
            raise
    context.tasks.start_soon(pool._monitor)
    logger.info("started %d worker(s) of %r from %s", settings.size, first.service, path)
    return pool


class Pool(Generic[T]):
    """Local worker processes of one service, supervised; call through ``pool.proxy``.

    ``pool.proxy`` is typed as the service class. Attribute access on the pool
    itself forwards to the proxy too (``await pool.resize(img)``), untyped.
    """

    def __init__(self, supervisor: Supervisor, proxy: T, pools: list[Pool[Any]]) -> None:
        self.proxy = proxy
        self.service = supervisor.service
        self.path = supervisor.path
        self.settings = supervisor.settings
        self._supervisor = supervisor
        self._pools = pools
        scale = self.settings.autoscale
        self._autoscaler = Autoscaler(scale, self.settings.options.concurrency) if scale else None
        self._resizing = anyio.Lock()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.proxy, name)

    @property
    def workers(self) -> list[WorkerProcess]:
        """The worker processes running now (a list the pool keeps up to date)."""
        return self._supervisor.workers

    @property
    def failed(self) -> int:
        """Slots given up after too many crashes."""
        return self._supervisor.failed

    @property
    def size(self) -> int:
        """How many workers the pool keeps running."""
        return self._supervisor.target

    async def scale(self, n: int) -> None:
        """Run ``n`` workers: start new ones, or drain the least busy (their calls finish)."""
        if n < 0:
            raise ConfigError(f"a pool cannot have {n} workers")
        supervisor = self._supervisor
        async with self._resizing:
            before, supervisor.target = supervisor.target, n
            live = supervisor.live()
            if n > len(live):
                try:
                    await supervisor.start(n - len(live))
                except SpawnError:
                    supervisor.target = len(supervisor.live())
                    raise
            elif n < len(live):
                try:
                    busy = {r.worker_id: r.in_flight for r in await supervisor.records()}
                except REDIS_ERRORS:  # Redis out of reach: which is least busy is unknown; any drains
                    busy = {}
                ordered = sorted(live, key=lambda w: busy.get(w.worker_id, 0))
                async with anyio.create_task_group() as tg:
                    for worker in ordered[: len(live) - n]:
                        tg.start_soon(supervisor.retire, worker, "scaled down")
            if before != n:
                supervisor.emit("scaled", None, f"{before} -> {n} workers")

    async def stop_worker(self, worker: WorkerProcess, timeout: float = 30.0) -> int:
        """Drain and stop one of this pool's workers (calls in flight finish, SIGKILL after ``timeout``);
        it is not restarted and the pool keeps one worker fewer. Its exit code; ConfigError for a
        worker that is not running in this pool."""
        return await self._supervisor.stop(worker, timeout)

    async def metrics(self) -> PoolMetrics:
        """Workers, busy, backlog, calls, errors, latency percentiles, CPU and RSS of the pool."""
        records = await self._supervisor.records()
        backlog = await self._backlog()
        summary = LatencyHistogram.merged(r.latency for r in records).summary()
        meter = self._supervisor.meter
        return PoolMetrics(
            workers=len(self.workers),
            busy=sum(r.in_flight for r in records),
            backlog=backlog,
            calls=sum(r.calls for r in records),
            errors=sum(r.errors for r in records),
            p50_ms=summary["p50"],
            p95_ms=summary["p95"],
            p99_ms=summary["p99"],
            cpu=round(sum(meter.cpu(w.pid) for w in self.workers), 3),
            rss=sum(meter.rss(w.pid) for w in self.workers),
            failed=self.failed,
        )

    async def _backlog(self) -> int:
        """Calls waiting or running in the service's streams (all hosts, every shard)."""
        client = self._supervisor.context.client
        return await backlog(client.redis, client.keys, self.service)

    async def drain(self, timeout: float = 30.0) -> bool:
        """Wait until no call is waiting or running in the service's stream; False on timeout."""
        with anyio.move_on_after(timeout):
            # The state lives in Redis: poll it.
            while await self._backlog():  # noqa: ASYNC110
                await anyio.sleep(0.05)
            return True
        return False

    async def close(self, timeout: float = 30.0) -> None:
        """Stop every worker of the pool (SIGTERM: calls in flight finish, SIGKILL after ``timeout``)."""
        await self._supervisor.close(timeout)
        if self in self._pools:
            self._pools.remove(self)

    # -- the monitor: recycling, health, autoscale -------------------------------------------

    async def _monitor(self, interval: float = 1.0) -> None:
        """Every ``interval`` s, replace the workers that need it; resize at the autoscale interval."""
        scaler = self._autoscaler
        next_scale = time.monotonic() + (scaler.policy.interval if scaler else 0)
        out_of_reach = False  # an outage is one line when it starts and one when it ends
        while not self._supervisor.closed:
            await anyio.sleep(interval)
            try:
                await self._check_workers()
                if out_of_reach:
                    logger.warning("pool %s: reaches Redis again", self.service)
                    out_of_reach = False
                if scaler is not None and time.monotonic() >= next_scale:
                    next_scale = time.monotonic() + scaler.policy.interval
                    await self._autoscale(scaler)
            except REDIS_ERRORS as exc:
                if not out_of_reach:
                    logger.warning("pool %s: cannot reach Redis (%s); its workers run on, checked again "
                                   "every %g s", self.service, exc, interval)  # fmt: skip
                out_of_reach = True
            except Exception:
                logger.exception("pool %s: monitor step failed", self.service)

    async def _check_workers(self) -> None:
        supervisor = self._supervisor
        records = {r.worker_id: r for r in await supervisor.records()}
        now = time.time()
        for worker in supervisor.live():
            rss = supervisor.meter.rss(worker.pid) if self.settings.memory_limit else 0
            record = records.get(worker.worker_id)
            reason = replacement_reason(self.settings, record, now - worker.started_at, rss)
            if reason is not None:
                supervisor.context.tasks.start_soon(supervisor.replace, worker, *reason)

    async def _autoscale(self, scaler: Autoscaler) -> None:
        live = self._supervisor.live()
        if not live or self._resizing.locked():
            return
        cpu = sum(self._supervisor.meter.cpu(w.pid) for w in live)
        backlog = await self._backlog()
        size = scaler.decide(len(live), cpu, backlog, time.monotonic())
        if size is not None:
            logger.info("pool %s: scaling to %d (cpu %.2f, backlog %d)", self.service, size, cpu, backlog)
            await self.scale(size)
