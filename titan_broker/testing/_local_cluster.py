"""A private Redis Cluster: primaries with replicas made by ``redis-cli --cluster create``, TLS optional.

For tests and benchmarks on a cluster: it knows which node serves a
key, can kill a primary and wait, bounded, for its replica's promotion, and
heal (the old primary rejoins as a replica). A cluster may speak TLS only
(``LocalCluster(tls=TlsFiles(...))``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import redis
import redis.cluster
import redis.sentinel

from .._errors import TitanError
from ._local_redis import (
    REPLICA_SPEEDUPS,
    STARTUP_TIMEOUT,
    LocalRedis,
    PrivateServer,
    TlsFiles,
    auth_url,
    command,
    find_redis_cli,
    find_redis_server,
    free_port,
    info,
    wait_for,
)

CLUSTER_SLOTS = 16384
BUS_PORT_OFFSET = 10000
"""A cluster node talks to the others on its port + 10000 (Redis 6.2 has no ``cluster-port``)."""


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
            return auth_url("redis", self.password, f"127.0.0.1:{self.port}")
        return auth_url("rediss", self.password, f"127.0.0.1:{self.port}", self.tls.query)

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


class LocalCluster(PrivateServer):
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
