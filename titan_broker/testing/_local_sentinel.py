"""A private Redis Sentinel set-up: a primary, a replica and ``redis-server --sentinel`` processes.

For tests behind Sentinel: it can kill the primary and wait, bounded, for
the sentinels to promote the replica, and heal.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Self, cast

import redis
import redis.cluster
import redis.sentinel

from .._errors import TitanError
from ._local_redis import (
    PROBE_TIMEOUT,
    REPLICA_SPEEDUPS,
    STARTUP_TIMEOUT,
    LocalRedis,
    PrivateServer,
    auth_url,
    command,
    find_redis_server,
    info,
    wait_for,
)


class LocalSentinel(PrivateServer):
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
        return auth_url("redis+sentinel", self.password, hosts, f"/{self.name}")

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
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            [("127.0.0.1", s.port or 0) for s in self.sentinels], socket_timeout=PROBE_TIMEOUT
        )
        client = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            self.name, password=self.password, db=db, socket_timeout=5.0
        )
        return cast(redis.Redis, client)


def _pairs(flat: list[Any]) -> dict[str, str]:
    """A SENTINEL reply (a flat list: name, value, name, value...) as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
