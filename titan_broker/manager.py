"""ProcessManager: spawn local worker processes, connect to remote services, shut down cleanly."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar, overload

import anyio
import anyio.abc

from .client import DEFAULT_TIMEOUT, Client, ServiceProxy
from .config import ENV_NAMESPACE, ENV_URL, check_name
from .dead_letters import DeadLetter, list_dead_letters, purge_dead_letters, replay_dead_letters
from .decorators import PROCESS_ATTR, ProcessInfo
from .errors import ConfigError, SpawnError, TitanError

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

    @property
    def pid(self) -> int:
        return self.process.pid


class ProcessManager:
    """Spawns and stops local workers and hands out typed proxies to services.

    ``ProcessManager(url)`` does no I/O; ``async with`` connects to Redis and
    leaving the block shuts down every worker this manager spawned. The URL
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
        self.workers: list[WorkerProcess] = []
        self._entered = False

    @property
    def namespace(self) -> str:
        return self.client.namespace

    async def __aenter__(self) -> ProcessManager:
        await self.client.__aenter__()
        self._entered = True
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
            self._entered = False
            await self.client.aclose()

    def _check_entered(self) -> None:
        if not self._entered:
            raise TitanError("ProcessManager is not started: use 'async with ProcessManager(...) as pm'")

    @overload
    async def spawn(
        self,
        path: str | os.PathLike[str],
        cls: type[T],
        *,
        dependencies: Mapping[str, Any] | None = ...,
        name: str | None = ...,
        concurrency: int = ...,
        startup_timeout: float | None = ...,
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
        startup_timeout: float | None = ...,
    ) -> ServiceProxy: ...
    async def spawn(
        self,
        path: str | os.PathLike[str],
        cls: type[Any] | None = None,
        *,
        dependencies: Mapping[str, Any] | None = None,
        name: str | None = None,
        concurrency: int = 16,
        startup_timeout: float | None = None,
    ) -> Any:
        """Start a worker process for the service in ``path`` and return a proxy to the service.

        Waits until the worker has registered as ready (``startup_timeout``,
        default 30 s). ``dependencies`` (JSON values) reach the service's
        ``init()`` by name; ``name`` serves it under another service name.
        Raises SpawnError, carrying the child's message and the file name, when
        the worker exits or is not ready in time.
        """
        self._check_entered()
        shown = os.fspath(path)
        if not await anyio.Path(shown).is_file():
            raise SpawnError(shown, "file not found (give the path to a .py file holding one @process class)")
        if name is not None:
            check_name(name, "service name")
        expected = _expected_name(cls, name)
        worker_id = f"{os.uname().nodename}-{uuid.uuid4().hex[:10]}"
        try:
            deps_json = json.dumps(dict(dependencies or {}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"dependencies for {shown} must be JSON values: {exc}") from exc
        read_fd, write_fd = os.pipe()
        command = [
            sys.executable, "-m", "titan_worker", "run", shown,
            "--worker-id", worker_id, "--ready-fd", str(write_fd), "--concurrency", str(concurrency),
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
                command,
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                env=env,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        try:
            message = await self._await_ready(
                read_fd, process, shown, startup_timeout or self.startup_timeout
            )
        finally:
            os.close(read_fd)
        worker = WorkerProcess(
            shown,
            str(message["service"]),
            worker_id,
            process,
            frozenset(message.get("methods", ())),
        )
        self.workers.append(worker)
        if expected is not None and expected != worker.service:
            raise ConfigError(
                f"{shown} serves {worker.service!r} but the class passed to spawn() is {expected!r}"
            )
        logger.info("spawned %s (pid %d) for %r", worker_id, process.pid, worker.service)
        return ServiceProxy(self.client, worker.service, methods=worker.methods, timeout=None)

    async def _await_ready(
        self, fd: int, process: anyio.abc.Process, path: str, timeout: float
    ) -> dict[str, Any]:
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

    @overload
    async def connect(self, service: str, cls: type[T]) -> T: ...
    @overload
    async def connect(self, service: str, cls: None = ...) -> ServiceProxy: ...
    async def connect(self, service: str, cls: type[Any] | None = None) -> Any:
        """A proxy for ``service``, whose workers may run on any host.

        No worker needs to be alive now: calls wait for one within their timeout.
        """
        self._check_entered()
        check_name(service, "service name")
        expected = _expected_name(cls, None)
        if expected is not None and expected != service:
            logger.info("connecting %s as service %r", getattr(cls, "__name__", cls), service)
        return self.client.proxy(service, cls)

    async def dead_letters(self, service: str, *, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters of ``service``."""
        self._check_entered()
        return await list_dead_letters(self.client.redis, self.client.keys, service, count=count)

    async def replay_dead_letters(
        self, service: str, ids: list[str] | None = None, *, timeout: float = 60.0
    ) -> int:
        """Put dead letters (all, or ``ids``) back on the service's stream; return how many."""
        self._check_entered()
        return await replay_dead_letters(self.client.redis, self.client.keys, service, ids, timeout=timeout)

    async def purge_dead_letters(self, service: str, ids: list[str] | None = None) -> int:
        """Delete dead letters (all, or ``ids``); return how many."""
        self._check_entered()
        return await purge_dead_letters(self.client.redis, self.client.keys, service, ids)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every worker this manager spawned: SIGTERM, let it drain, SIGKILL after ``timeout``."""
        workers, self.workers = self.workers, []
        if not workers:
            return
        async with anyio.create_task_group() as tg:
            for w in workers:
                tg.start_soon(_terminate, w.process, timeout)

    async def stop_worker(self, worker: WorkerProcess, timeout: float = 30.0) -> int:
        """Drain and stop one spawned worker; return its exit code."""
        if worker in self.workers:
            self.workers.remove(worker)
        return await _terminate(worker.process, timeout)


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
