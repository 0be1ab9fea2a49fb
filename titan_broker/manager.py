"""ProcessManager: spawn and supervise local workers and pools, find and call services anywhere."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any, TypeVar, overload

import anyio
import anyio.abc

from .breaker import CircuitBreaker
from .client import DEFAULT_TIMEOUT, Client, ServiceProxy
from .config import ENV_NAMESPACE, ENV_URL, WorkerOptions, check_name
from .connection import CONNECTION_ERRORS
from .dead_letters import DeadLetter, list_dead_letters, purge_dead_letters, replay_dead_letters
from .decorators import PROCESS_ATTR, ProcessInfo
from .errors import ConfigError, SpawnError, TitanError
from .events import Event, EventBus
from .health import ServiceHealth, aggregate
from .pool import AutoScale, Pool, PoolSettings, RestartPolicy
from .registry import ServiceInfo, WorkerInfo, list_services, list_workers

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_STARTUP_TIMEOUT = 30.0


@dataclass
class WorkerProcess:
    """A worker process this manager started."""

    path: str
    service: str
    worker_id: str
    process: anyio.abc.Process
    methods: frozenset[str] = field(default_factory=frozenset)
    started_at: float = field(default_factory=time.time)
    streaming: frozenset[str] = field(default_factory=frozenset)

    @property
    def pid(self) -> int:
        return self.process.pid


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
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def namespace(self) -> str:
        return self.client.namespace

    @property
    def workers(self) -> list[WorkerProcess]:
        """Every live worker process this manager runs, in all its pools."""
        return [w for pool in self.pools for w in pool.workers]

    async def __aenter__(self) -> ProcessManager:
        await self.client.__aenter__()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
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
            tg, self._tg = self._tg, None
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
            self.events.close()
            await self.client.aclose()

    def _task_group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise TitanError("ProcessManager is not started: use 'async with ProcessManager(...) as pm'")
        return self._tg

    def _spawn_task(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run a background task of this manager (ended when the manager closes)."""
        self._task_group().start_soon(fn, *args)

    def _watch(self, worker: WorkerProcess, on_exit: Callable[[WorkerProcess, int], None]) -> None:
        async def wait() -> None:
            code = await worker.process.wait()
            on_exit(worker, code)

        self._spawn_task(wait)

    async def _clear_record(self, worker: WorkerProcess) -> None:
        """Remove the registry record of a local worker that died."""
        keys = self.client.keys
        with contextlib.suppress(*CONNECTION_ERRORS):
            async with self.client.redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.worker(worker.service, worker.worker_id))
                pipe.srem(keys.workers(worker.service), worker.worker_id)
                await pipe.execute()

    def _forget_pool(self, pool: Pool[Any]) -> None:
        if pool in self.pools:
            self.pools.remove(pool)

    # -- spawning --------------------------------------------------------------------------

    async def _start_worker(
        self,
        path: str,
        *,
        dependencies: Mapping[str, Any] | None,
        name: str | None,
        options: WorkerOptions,
        startup_timeout: float | None = None,
    ) -> WorkerProcess:
        """Start ``titan-worker run path`` and wait until it has registered as ready."""
        if not await anyio.Path(path).is_file():
            raise SpawnError(path, "file not found (give the path to a .py file holding one @process class)")
        worker_id = f"{os.uname().nodename}-{uuid.uuid4().hex[:10]}"
        try:
            deps_json = json.dumps(dict(dependencies or {}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"dependencies for {path} must be JSON values: {exc}") from exc
        read_fd, write_fd = os.pipe()
        command = [
            sys.executable, "-m", "titan_worker", "run", path,
            "--worker-id", worker_id, "--ready-fd", str(write_fd), "--parent-pid", str(os.getpid()),
            # Every option, whole: a flag per field would drift from WorkerOptions.
            "--options-json", json.dumps(asdict(options)),
        ]  # fmt: skip
        if name is not None:
            command += ["--name", name]
        env = {
            **os.environ,
            ENV_URL: self.client.url,
            ENV_NAMESPACE: self.namespace,
            "TITAN_DEPENDENCIES": deps_json,
        }
        try:
            process = await anyio.open_process(
                command, stdin=subprocess.DEVNULL, stdout=None, stderr=None, env=env, pass_fds=(write_fd,)
            )
        finally:
            os.close(write_fd)
        try:
            message = await _await_ready(read_fd, process, path, startup_timeout or self.startup_timeout)
        except BaseException:
            # Cancelled or failed while starting: never leave the child behind.
            if process.returncode is None:
                process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
            raise
        finally:
            os.close(read_fd)
        worker = WorkerProcess(
            path,
            str(message["service"]),
            worker_id,
            process,
            frozenset(message.get("methods", ())),
            streaming=frozenset(message.get("streaming", ())),
        )
        self.events.emit(Event("ready", worker.service, worker_id, process.pid, path))
        return worker

    async def _create_pool(
        self,
        path: str | os.PathLike[str],
        cls: type[Any] | None,
        settings: PoolSettings,
        *,
        startup_timeout: float | None,
        breaker: CircuitBreaker | None,
    ) -> Pool[Any]:
        self._task_group()
        shown = os.fspath(path)
        if settings.name is not None:
            check_name(settings.name, "service name")
        expected = _expected_name(cls, settings.name)
        # The first worker tells what the service is called and what it offers.
        first = await self._start_worker(
            shown,
            dependencies=settings.dependencies,
            name=settings.name,
            options=settings.options,
            startup_timeout=startup_timeout,
        )
        if expected is not None and expected != first.service:
            await _terminate(first.process, grace=5.0)
            raise ConfigError(f"{shown} serves {first.service!r} but the class passed is {expected!r}")
        proxy = ServiceProxy(
            self.client, first.service, methods=first.methods, timeout=None, breaker=breaker,
            streaming=first.streaming,
        )  # fmt: skip
        pool: Pool[Any] = Pool(self, shown, proxy, service=first.service, settings=settings)
        pool.workers.append(first)
        self._watch(first, pool._on_exit)
        self.pools.append(pool)
        if settings.size > 1:
            try:
                await pool._start(settings.size - 1)
            except BaseException:
                await pool.close()  # a pool starts whole or not at all
                raise
        self._spawn_task(pool._monitor)
        logger.info("started %d worker(s) of %r from %s", settings.size, first.service, shown)
        return pool

    @overload
    async def spawn(
        self,
        path: str | os.PathLike[str],
        cls: type[T],
        *,
        dependencies: Mapping[str, Any] | None = ...,
        name: str | None = ...,
        concurrency: int = ...,
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
        concurrency: int = ...,
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
        concurrency: int = 16,
        restart: RestartPolicy | None = RestartPolicy(),  # noqa: B008 - frozen, shared safely
        options: WorkerOptions | None = None,
        startup_timeout: float | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> Any:
        """Start one supervised worker process for the service in ``path``; return a proxy.

        Waits until the worker has registered as ready (``startup_timeout``,
        default 30 s). ``dependencies`` (JSON values) reach the service's
        ``init()`` by name; ``name`` serves it under another service name; a
        crashed worker is restarted per ``restart`` (None: never). Raises
        SpawnError, with the child's message and the file name, when the
        worker exits or is not ready in time.
        """
        settings = PoolSettings(
            restart=restart,
            dependencies=dict(dependencies or {}),
            name=name,
            options=replace(options or WorkerOptions(), concurrency=concurrency),
        )
        pool = await self._create_pool(path, cls, settings, startup_timeout=startup_timeout, breaker=breaker)
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
        concurrency: int = 16,
        options: WorkerOptions | None = None,
        startup_timeout: float | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> Pool[T]:
        """Start ``size`` supervised workers of the service in ``path`` (default: autoscale.min or 1).

        ``autoscale`` grows and shrinks the pool; ``restart`` restarts crashed
        workers; a worker is recycled (replacement first) after
        ``recycle_after_calls`` calls, ``max_lifetime`` seconds or when its RSS
        passes ``memory_limit`` bytes, and replaced after
        ``unhealthy_threshold`` failed health checks in a row. Call the
        service through ``pool.proxy`` (typed as ``cls``).
        """
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
            options=replace(options or WorkerOptions(), concurrency=concurrency),
        )
        return await self._create_pool(path, cls, settings, startup_timeout=startup_timeout, breaker=breaker)

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
        self._task_group()
        check_name(service, "service name")
        streaming = await self.client.streaming_methods(service)
        return self.client.proxy(service, cls, breaker=breaker, streaming=streaming)

    # -- discovery, health, events ---------------------------------------------------------

    async def services(self, *, live_only: bool = True) -> list[ServiceInfo]:
        """Every service with live workers (on any host), with versions, methods and workers."""
        self._task_group()
        return await list_services(self.client.redis, self.client.keys, live_only=live_only)

    async def workers_of(self, service: str) -> list[WorkerInfo]:
        """The live workers of ``service`` on every host."""
        self._task_group()
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
        self._task_group()
        return await list_dead_letters(self.client.redis, self.client.keys, service, count=count)

    async def replay_dead_letters(
        self, service: str, ids: list[str] | None = None, *, timeout: float = 60.0
    ) -> int:
        """Put dead letters (all, or ``ids``) back on the service's stream; return how many."""
        self._task_group()
        return await replay_dead_letters(self.client.redis, self.client.keys, service, ids, timeout=timeout)

    async def purge_dead_letters(self, service: str, ids: list[str] | None = None) -> int:
        """Delete dead letters (all, or ``ids``); return how many."""
        self._task_group()
        return await purge_dead_letters(self.client.redis, self.client.keys, service, ids)

    # -- stopping --------------------------------------------------------------------------

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every worker this manager started: SIGTERM, let it drain, SIGKILL after ``timeout``."""
        pools, self.pools = list(self.pools), []
        async with anyio.create_task_group() as tg:
            for pool in pools:
                tg.start_soon(pool.close, timeout)

    async def stop_worker(self, worker: WorkerProcess, timeout: float = 30.0) -> int:
        """Drain and stop one worker process; return its exit code."""
        return await _terminate(worker.process, timeout)


async def _await_ready(fd: int, process: anyio.abc.Process, path: str, timeout: float) -> dict[str, Any]:
    """Read the child's readiness line (or its start-up error) from the pipe."""
    buffer = b""
    with anyio.move_on_after(timeout):
        while b"\n" not in buffer:
            await anyio.wait_readable(fd)
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
        if b"\n" in buffer:
            message: dict[str, Any] = json.loads(buffer.split(b"\n", 1)[0])
            if message.get("event") == "ready":
                return message
            code = await process.wait()
            raise SpawnError(path, str(message.get("message", "unknown error")), exit_code=code)
        code = await process.wait()
        raise SpawnError(path, f"worker exited with code {code} before it was ready (see its stderr)",
                         exit_code=code)  # fmt: skip
    await _terminate(process, grace=1.0)
    raise SpawnError(path, f"worker was not ready within {timeout:g} s; it was stopped")


def _expected_name(cls: type[Any] | None, name: str | None) -> str | None:
    if name is not None or cls is None:
        return name
    info = getattr(cls, PROCESS_ATTR, None)
    if not isinstance(info, ProcessInfo):
        raise ConfigError(f"{cls.__qualname__} is not a service: decorate it with @process(name=...)")
    return info.name


async def _terminate(process: anyio.abc.Process, grace: float) -> int:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit code."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            return await process.wait()
        logger.warning("worker pid %d did not stop within %.1f s; killing it", process.pid, grace)
        process.kill()
    return await process.wait()
