"""Worker processes on this host: start one for a service file as a child, stop it, measure it.

A child reports readiness (or why it could not start) as one JSON line on a
pipe whose end it inherits (``--ready-fd``), drains on SIGTERM, and stops by
itself when its parent is gone (``--parent-pid``). Pools start every worker
through a WorkerLauncher; nothing here knows about pools or the manager.
"""

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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import anyio.abc
import psutil

from .._config import ENV_NAMESPACE, ENV_URL, WorkerOptions
from .._errors import ConfigError, SpawnError

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT = 30.0


@dataclass
class WorkerProcess:
    """A worker process started on this host, as it described itself when it was ready."""

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

    async def wait(self) -> int:
        """Wait until the process exits; return its exit code."""
        return await self.process.wait()

    async def stop(self, grace: float) -> int:
        """Drain it through SIGTERM (calls in flight finish), SIGKILL after ``grace`` s; the exit code."""
        return await terminate(self.process, grace)


@dataclass(frozen=True)
class WorkerLauncher:
    """Starts workers that serve through one Redis and namespace, and waits until each is ready."""

    url: str
    namespace: str
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT

    async def start(
        self,
        path: str,
        *,
        dependencies: Mapping[str, Any],
        name: str | None,
        options: WorkerOptions,
        startup_timeout: float | None = None,
    ) -> WorkerProcess:
        """Start ``python -m titan_worker.start path``; return once it registered, else SpawnError.

        The SpawnError carries the child's own message (file not found, no
        @process class, init() raised...) as soon as the child gives up, or
        says that it was not ready within ``startup_timeout`` (then it was
        stopped). A cancelled start never leaves the child behind.
        """
        if not await anyio.Path(path).is_file():
            raise SpawnError(path, "file not found (give the path to a .py file holding one @process class)")
        try:
            deps_json = json.dumps(dict(dependencies))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"dependencies for {path} must be JSON values: {exc}") from exc
        worker_id = f"{os.uname().nodename}-{uuid.uuid4().hex[:10]}"
        read_fd, write_fd = os.pipe()
        command = [
            # The lean entry point: no command-line framework to import (titan-worker run is for people).
            sys.executable, "-m", "titan_worker.start", path,
            "--worker-id", worker_id, "--ready-fd", str(write_fd), "--parent-pid", str(os.getpid()),
            # Every option, whole: a flag per field would drift from WorkerOptions.
            "--options-json", json.dumps(asdict(options)),
        ]  # fmt: skip
        if name is not None:
            command += ["--name", name]
        env = {
            **os.environ,
            ENV_URL: self.url,
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
        return WorkerProcess(
            path,
            str(message["service"]),
            worker_id,
            process,
            frozenset(message.get("methods", ())),
            streaming=frozenset(message.get("streaming", ())),
        )


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
    await terminate(process, grace=1.0)
    raise SpawnError(path, f"worker was not ready within {timeout:g} s; it was stopped")


async def terminate(process: anyio.abc.Process, grace: float) -> int:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit code."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            return await process.wait()
        logger.warning("worker pid %d did not stop within %.1f s; killing it", process.pid, grace)
        process.kill()
    return await process.wait()


class ProcessMeter:
    """CPU and resident memory of local processes (psutil); a process gone reads as 0."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def cpu(self, pid: int) -> float:
        """CPUs used since the previous reading of ``pid`` (1.0 = one core busy); 0.0 at the first."""
        proc = self._process(pid)
        with contextlib.suppress(psutil.Error):
            return proc.cpu_percent(None) / 100 if proc else 0.0
        return 0.0

    def rss(self, pid: int) -> int:
        """Resident memory of ``pid``, bytes."""
        proc = self._process(pid)
        with contextlib.suppress(psutil.Error):
            return int(proc.memory_info().rss) if proc else 0
        return 0

    def forget(self, pid: int) -> None:
        self._procs.pop(pid, None)

    def _process(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
                proc.cpu_percent(None)  # the first reading only sets the baseline
            except psutil.Error:
                return None
            self._procs[pid] = proc
        return proc
