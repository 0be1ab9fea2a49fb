"""ProcessManager: spawn and supervise local workers and pools, find and call services anywhere."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast, overload

import anyio
import anyio.abc

from .._calling.breaker import CircuitBreaker
from .._calling.client import DEFAULT_TIMEOUT, Client, ServiceProxy
from .._calling.jobs import Job, JobState, JobStatus, list_jobs
from .._calling.proxy import RemoteMethod
from .._config import WorkerOptions, check_name
from .._errors import ConfigError, TitanError
from .._registry.dead_letters import DeadLetter, list_dead_letters, purge_dead_letters, replay_dead_letters
from .._registry.health import ServiceHealth, aggregate
from .._registry.records import ServiceInfo, WorkerInfo, list_services, list_workers
from .._service.decorators import PROCESS_ATTR, ProcessInfo
from .._wire.values import wire_type
from .events import Event, EventBus
from .launcher import DEFAULT_STARTUP_TIMEOUT, WorkerLauncher
from .launcher import WorkerProcess as WorkerProcess
from .policies import AutoScale, PoolSettings, RestartPolicy, worker_options
from .pool import Pool, start_pool
from .supervisor import PoolContext

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


class ProcessManager:
    """Spawns and supervises local workers and pools, and hands out typed proxies to services.

    ``ProcessManager(url)`` does no I/O; ``async with`` connects to Redis and
    leaving the block shuts down every worker this manager started. The URL
    defaults to $TITAN_REDIS_URL, the namespace to $TITAN_NAMESPACE or 'titan'.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        self.client = Client(url, namespace=namespace, default_timeout=default_timeout)
        self.startup_timeout = startup_timeout
        self.events = EventBus()
        self.pools: list[Pool[Any]] = []
        """The open pools of this manager (a pool leaves the list when it closes)."""
        self._context: PoolContext | None = None

    @property
    def namespace(self) -> str:
        return self.client.namespace

    @property
    def workers(self) -> list[WorkerProcess]:
        """Every live worker process this manager runs, in all its pools."""
        return [w for pool in self.pools for w in pool.workers]

    async def __aenter__(self) -> ProcessManager:
        await self.client.__aenter__()
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        launcher = WorkerLauncher(self.client.url, self.namespace, self.startup_timeout)
        self._context = PoolContext(launcher, self.client, self.events, tasks)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.shutdown()
        finally:
            context, self._context = self._context, None
            if context is not None:
                context.tasks.cancel_scope.cancel()
                await context.tasks.__aexit__(None, None, None)
            self.events.close()
            await self.client.aclose()

    def _started(self) -> PoolContext:
        """What this manager's pools share; a TitanError before ``async with``."""
        if self._context is None:
            raise TitanError("ProcessManager is not started: use 'async with ProcessManager(...) as pm'")
        return self._context

    # -- spawning --------------------------------------------------------------------------

    @overload
    async def spawn(
        self,
        path: str | os.PathLike[str],
        cls: type[T],
        *,
        dependencies: Mapping[str, Any] | None = ...,
        name: str | None = ...,
        concurrency: int | None = ...,
        restart: RestartPolicy | None = ...,
        options: WorkerOptions | None = ...,
        startup_timeout: float | None = ...,
        breaker: CircuitBreaker | None = ...,
    ) -> T: ...
    @overload
    async def spawn(
        self,
        path: str | os.PathLike[str],
        cls: None = ...,
        *,
        dependencies: Mapping[str, Any] | None = ...,
        name: str | None = ...,
        concurrency: int | None = ...,
        restart: RestartPolicy | None = ...,
        options: WorkerOptions | None = ...,
        startup_timeout: float | None = ...,
        breaker: CircuitBreaker | None = ...,
    ) -> ServiceProxy: ...
    async def spawn(
        self,
        path: str | os.PathLike[str],
        cls: type[Any] | None = None,
        *,
        dependencies: Mapping[str, Any] | None = None,
        name: str | None = None,
        concurrency: int | None = None,
        restart: RestartPolicy | None = RestartPolicy(),  # noqa: B008 - frozen, shared safely
        options: WorkerOptions | None = None,
        startup_timeout: float | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> Any:
        """Start one supervised worker process for the service in ``path``; return a proxy.

        Waits until the worker has registered as ready (``startup_timeout``,
        default 30 s). ``dependencies`` (JSON values) reach the service's
        ``init()`` by name; ``name`` serves it under another service name; a
        crashed worker is restarted per ``restart`` (None: never).
        ``concurrency`` is the worker's, else ``options.concurrency``, else
        16; a different value in both is a ConfigError. Raises SpawnError,
        with the child's message and the file name, when the worker exits or
        is not ready in time. It is a pool of one (see ``pool``).
        """
        pool = await self.pool(
            path, cls, restart=restart, dependencies=dependencies, name=name, concurrency=concurrency,
            options=options, startup_timeout=startup_timeout, breaker=breaker,
        )  # fmt: skip
        return pool.proxy

    async def pool(
        self,
        path: str | os.PathLike[str],
        cls: type[T] | None = None,
        *,
        size: int | None = None,
        autoscale: AutoScale | None = None,
        restart: RestartPolicy | None = RestartPolicy(),  # noqa: B008 - frozen, shared safely
        recycle_after_calls: int | None = None,
        max_lifetime: float | None = None,
        memory_limit: int | None = None,
        unhealthy_threshold: int = 3,
        dependencies: Mapping[str, Any] | None = None,
        name: str | None = None,
        concurrency: int | None = None,
        options: WorkerOptions | None = None,
        startup_timeout: float | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> Pool[T]:
        """Start ``size`` supervised workers of the service in ``path`` (default: autoscale.min or 1).

        ``autoscale`` grows and shrinks the pool; ``restart`` restarts crashed
        workers; a worker is recycled (replacement first) after
        ``recycle_after_calls`` calls, ``max_lifetime`` seconds or when its RSS
        passes ``memory_limit`` bytes, and replaced after
        ``unhealthy_threshold`` failed health checks in a row. Each worker
        runs with ``options`` (WorkerOptions); ``concurrency`` overrides its
        default, and conflicts with a different ``options.concurrency``
        (ConfigError). Call the service through ``pool.proxy`` (typed as
        ``cls``).
        """
        context = self._started()
        shown = os.fspath(path)
        if name is not None:
            check_name(name, "service name")
        settings = PoolSettings(
            size=size if size is not None else (autoscale.min if autoscale else 1),
            autoscale=autoscale,
            restart=restart,
            recycle_after_calls=recycle_after_calls,
            max_lifetime=max_lifetime,
            memory_limit=memory_limit,
            unhealthy_threshold=unhealthy_threshold,
            dependencies=dict(dependencies or {}),
            name=name,
            options=worker_options(options, concurrency),
        )
        expected = _expected_name(cls, name)
        return await start_pool(
            context, self.pools, shown, settings,
            expected=expected, startup_timeout=startup_timeout, breaker=breaker, cls=cls,
        )  # fmt: skip

    @overload
    async def connect(self, service: str, cls: type[T], *, breaker: CircuitBreaker | None = ...) -> T: ...
    @overload
    async def connect(
        self, service: str, cls: None = ..., *, breaker: CircuitBreaker | None = ...
    ) -> ServiceProxy: ...
    async def connect(
        self, service: str, cls: type[Any] | None = None, *, breaker: CircuitBreaker | None = None
    ) -> Any:
        """A proxy for ``service``, whose workers may run on any host.

        No worker needs to be alive now: calls wait for one within their timeout.
        ``breaker`` makes calls fail fast after repeated failures.
        """
        self._started()
        check_name(service, "service name")
        streaming = await self.client.streaming_methods(service)
        return self.client.proxy(service, cls, breaker=breaker, streaming=streaming)

    # -- jobs --------------------------------------------------------------------------------

    async def submit(self, method: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Queue ``method(*args, **kwargs)`` as a job, and return it at once: ``pm.submit(calc.add, 5, 3)``.

        ``method`` is a proxy's method (typed: the arguments are checked, the
        job's result has the method's return type). The proxy's options apply:
        ``with_options(proxy, delay=..., at=..., deadline=..., result_ttl=...)``.
        The job runs whether or not this process is still there; read it later
        with ``pm.job(job.id)``. Raises TypeError for anything but a proxy's method.
        """
        if not isinstance(method, RemoteMethod):
            raise TypeError(f"submit() takes a proxy's method (pm.submit(calc.add, 1, 2)), not {method!r}")
        self._started()
        return cast(Job[R], await method.submit(args, kwargs))

    @overload
    def job(self, job_id: str) -> Job[Any]: ...
    @overload
    def job(self, job_id: str, result: type[R]) -> Job[R]: ...
    def job(self, job_id: str, result: Any = None) -> Job[Any]:
        """The job with this id (from ``submit``, in any process); ``result``: the type its result
        is decoded into (plain data without)."""
        self._started()
        decoder = wire_type(result) if result is not None else None
        return self.client.job(job_id, decoder.decode if decoder is not None else None)

    async def jobs(self, service: str, *, state: JobState | None = None, count: int = 100) -> list[JobStatus]:
        """The latest jobs of ``service``, newest first (of one ``state`` if given)."""
        self._started()
        return await list_jobs(self.client.redis, self.client.keys, service, state=state, count=count)

    # -- discovery, health, events ---------------------------------------------------------

    async def services(self, *, live_only: bool = True) -> list[ServiceInfo]:
        """Every service with live workers (on any host), with versions, methods and workers."""
        self._started()
        return await list_services(self.client.redis, self.client.keys, live_only=live_only)

    async def workers_of(self, service: str) -> list[WorkerInfo]:
        """The live workers of ``service`` on every host."""
        self._started()
        return await list_workers(self.client.redis, self.client.keys, service)

    async def health(self, service: str) -> ServiceHealth:
        """The health of ``service`` across all its live workers, with this manager's failed slots."""
        workers = await self.workers_of(service)
        failed = sum(p.failed for p in self.pools if p.service == service)
        return aggregate(service, workers, failed)

    def on_event(self, callback: Callable[[Event], object]) -> Callable[[], None]:
        """Call ``callback`` on every lifecycle event; returns an unsubscribe function."""
        return self.events.on(callback)

    def subscribe(self) -> AsyncIterator[Event]:
        """Lifecycle events from now on: ``async for event in pm.subscribe(): ...``."""
        return self.events.subscribe()

    # -- dead letters ----------------------------------------------------------------------

    async def dead_letters(self, service: str, *, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters of ``service``."""
        self._started()
        return await list_dead_letters(self.client.redis, self.client.keys, service, count=count)

    async def replay_dead_letters(
        self, service: str, ids: list[str] | None = None, *, timeout: float = 60.0
    ) -> int:
        """Put dead letters (all, or ``ids``) back on the service's stream; return how many."""
        self._started()
        return await replay_dead_letters(self.client.redis, self.client.keys, service, ids, timeout=timeout)

    async def purge_dead_letters(self, service: str, ids: list[str] | None = None) -> int:
        """Delete dead letters (all, or ``ids``); return how many."""
        self._started()
        return await purge_dead_letters(self.client.redis, self.client.keys, service, ids)

    # -- stopping --------------------------------------------------------------------------

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every worker this manager started: SIGTERM, let it drain, SIGKILL after ``timeout``."""
        async with anyio.create_task_group() as tg:
            for pool in list(self.pools):
                tg.start_soon(pool.close, timeout)

    async def stop_worker(self, worker: WorkerProcess, timeout: float = 30.0) -> int:
        """Drain and stop one worker process (not restarted: its pool keeps one fewer); its exit code."""
        for pool in self.pools:
            if worker in pool.workers:
                return await pool.stop_worker(worker, timeout)
        raise ConfigError(f"{worker.worker_id} (pid {worker.pid}) is not a running worker of this manager")


def _expected_name(cls: type[Any] | None, name: str | None) -> str | None:
    if name is not None or cls is None:
        return name
    info = getattr(cls, PROCESS_ATTR, None)
    if not isinstance(info, ProcessInfo):
        raise ConfigError(f"{cls.__qualname__} is not a service: decorate it with @process(name=...)")
    return info.name
