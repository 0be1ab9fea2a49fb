"""The worker processes of one pool, kept alive: started, watched, restarted, retired on purpose.

A Supervisor acts on the rules of supervision.py (when to restart, when to
give a slot up) and starts processes through worker_process.py. It emits
the lifecycle events. What it needs from the manager that owns its pool is
a PoolContext, and nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import anyio
import anyio.abc

from .._calling.client import Client
from .._errors import ConfigError, SpawnError
from .._redis.connection import CONNECTION_ERRORS
from .._registry.records import WorkerInfo, read_workers, remove_worker
from .events import Event, EventBus, EventKind
from .launcher import ProcessMeter, WorkerLauncher, WorkerProcess
from .policies import CrashHistory, PoolSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolContext:
    """What a pool needs from the manager that owns it, and nothing more."""

    launcher: WorkerLauncher
    client: Client
    """The pool reads the registry and the backlog through it, and its proxy calls through it."""
    events: EventBus
    tasks: anyio.abc.TaskGroup
    """Runs the pools' background work (exit watchers, restarts, monitors); ends with the owner."""


class Supervisor:
    """Keeps ``target`` workers of one service running on this host.

    A worker that exits unexpectedly is restarted after a backoff, unless
    the crashes within the window pass the policy's limit: then its slot is
    given up (``failed``). A worker retired on purpose (scaled down,
    recycled, replaced, closed) is not restarted.
    """

    def __init__(
        self,
        context: PoolContext,
        path: str,
        service: str,
        settings: PoolSettings,
        startup_timeout: float | None = None,
    ) -> None:
        self.context = context
        self.path = path
        self.service = service
        self.settings = settings
        self.workers: list[WorkerProcess] = []
        self.target = settings.size
        self.failed = 0
        """Slots given up after too many crashes."""
        self.closed = False
        self.meter = ProcessMeter()
        self._retiring: dict[str, str] = {}
        """Workers being stopped on purpose, with the reason."""
        self._crashes = CrashHistory(settings.restart) if settings.restart else None
        self._startup_timeout = startup_timeout
        self._grace = settings.options.grace_period + 5

    def live(self) -> list[WorkerProcess]:
        """The workers not being stopped."""
        return [w for w in self.workers if w.worker_id not in self._retiring]

    async def records(self) -> list[WorkerInfo]:
        """The registry records of the workers that are alive."""
        client = self.context.client
        return await read_workers(
            client.redis, client.keys, self.service, [w.worker_id for w in self.workers]
        )

    def emit(self, kind: EventKind, worker: WorkerProcess | None, detail: str = "") -> None:
        who, pid = (worker.worker_id, worker.pid) if worker else (None, None)
        self.context.events.emit(Event(kind, self.service, who, pid, detail))

    # -- starting --------------------------------------------------------------------------

    def adopt(self, worker: WorkerProcess) -> None:
        """A worker that is ready joins; its exit is watched from now on."""
        self.workers.append(worker)
        self.emit("ready", worker, self.path)
        self.context.tasks.start_soon(self._watch, worker)

    async def add(self) -> WorkerProcess:
        """Start one more worker (raises SpawnError)."""
        worker = await self.context.launcher.start(
            self.path,
            dependencies=self.settings.dependencies,
            name=self.settings.name,
            options=self.settings.options,
            startup_timeout=self._startup_timeout,
        )
        self.adopt(worker)
        if self.closed:  # closed while this one was starting: it goes too
            await self.retire(worker, "pool closed")
        return worker

    async def start(self, count: int) -> None:
        """Start ``count`` workers at once; raise the first SpawnError (the others keep running)."""
        errors: list[BaseException] = []

        async def one() -> None:
            try:
                await self.add()
            except SpawnError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
        if errors:
            raise errors[0]

    # -- stopping on purpose ---------------------------------------------------------------

    async def retire(self, worker: WorkerProcess, reason: str, grace: float | None = None) -> int:
        """Drain one worker through SIGTERM (calls in flight finish); it is not restarted. Its exit code."""
        self._retiring[worker.worker_id] = reason
        return await worker.stop(self._grace if grace is None else grace)

    async def stop(self, worker: WorkerProcess, grace: float) -> int:
        """Stop one worker on its user's word: the pool keeps one fewer. Its exit code."""
        if worker not in self.live():
            raise ConfigError(
                f"{worker.worker_id} (pid {worker.pid}) is not a running worker of this pool "
                f"of {self.service!r}: it stopped already, or belongs to another pool"
            )
        self.target = max(0, self.target - 1)
        return await self.retire(worker, "stopped", grace)

    async def replace(self, worker: WorkerProcess, kind: EventKind, detail: str) -> None:
        """Start the replacement first, then drain the old worker."""
        if worker.worker_id in self._retiring or self.closed:
            return
        self._retiring[worker.worker_id] = kind
        self.emit(kind, worker, detail)
        try:
            await self.add()
        except SpawnError as exc:
            logger.error("pool %s: replacement for %s failed: %s", self.service, worker.worker_id, exc)
        await self.retire(worker, str(kind))

    async def close(self, timeout: float) -> None:
        """Stop every worker (SIGKILL after ``timeout``) and start no other."""
        self.closed = True
        workers, self.workers = list(self.workers), []
        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(self.retire, worker, "pool closed", timeout)

    # -- exits -----------------------------------------------------------------------------

    async def _watch(self, worker: WorkerProcess) -> None:
        self._on_exit(worker, await worker.wait())

    def _on_exit(self, worker: WorkerProcess, code: int) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        self.meter.forget(worker.pid)
        reason = self._retiring.pop(worker.worker_id, None)
        if reason is not None or self.closed:
            self.emit("stopped", worker, f"{reason or 'pool closed'}, exit code {code}")
            return
        self.emit("crashed", worker, f"exit code {code}")
        # It will not beat again: take it out of the registry now rather than at its TTL.
        self.context.tasks.start_soon(self._deregister, worker)
        self._after_crash(worker)

    async def _deregister(self, worker: WorkerProcess) -> None:
        client = self.context.client
        with contextlib.suppress(*CONNECTION_ERRORS):
            await remove_worker(client.redis, client.keys, self.service, worker.worker_id)

    def _after_crash(self, worker: WorkerProcess) -> None:
        """Restart after a backoff, unless the crashes within the window pass max_restarts."""
        if self._crashes is None or self.closed:
            self.target = max(0, self.target - 1)
            return
        delay = self._crashes.record(time.monotonic())
        if delay is None:
            policy = self._crashes.policy
            self.failed += 1
            self.target = max(0, self.target - 1)
            self.emit(
                "failed",
                worker,
                f"{len(self._crashes)} crashes within {policy.window:g} s "
                f"(max_restarts {policy.max_restarts}); not restarting",
            )
            return
        self.context.tasks.start_soon(self._restart_after, worker, delay)

    async def _restart_after(self, crashed: WorkerProcess, delay: float) -> None:
        await anyio.sleep(delay)
        if self.closed:
            return
        try:
            worker = await self.add()
        except SpawnError as exc:
            self.emit("crashed", crashed, f"restart failed: {exc.child_message}")
            self._after_crash(crashed)  # a restart that cannot start counts as another crash
            return
        self.emit("restarted", worker, f"replaces {crashed.worker_id} after {delay:.2f} s")
