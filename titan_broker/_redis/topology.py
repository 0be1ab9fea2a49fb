"""Where a key lives: one Redis, a Redis Cluster, or a primary that Redis Sentinel manages.

Users give one URL whatever runs behind it:

- ``redis://host:port`` (or ``rediss://``) of a single Redis, or of *any*
  node of a cluster: the cluster is detected (``INFO cluster``) and its slot
  map read from that node, no flag needed;
- ``redis+sentinel://[user:pass@]host:port[,host:port...]/<master>[?db=N]``
  (``redis+sentinels://`` for TLS to the primary): the primary is asked of the
  sentinels. The URL's credentials are the primary's; ``?sentinel_password=``
  (and ``sentinel_username=``) authenticate to the sentinels when they need it.

A ``Topology`` answers ``locate(key)`` (the address of the node that serves
a key, from its cached map) and ``refresh()`` (read the map again, after a
MOVED reply, a lost connection or a READONLY refusal: a failover). The hot
paths (``connection.Channel``) follow it by themselves; everything else goes
through ``client()``: redis-py's own client for that kind of deployment.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import ssl
import time
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.sentinel
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot

from .._config import redact, tls_options
from .._errors import ConfigError, RedisUnavailable

logger = logging.getLogger(__name__)

Address = tuple[str, int]
Kind = Literal["single", "cluster", "sentinel"]

SLOTS = 16384
REFRESH_AT_MOST_EVERY = 0.05
"""Seconds between two reads of the map: many channels noticing one failover read it once."""
PROBE_TIMEOUT = 2.0
"""Seconds to reach one node (or sentinel) while reading the map."""

SENTINEL_SCHEMES = {"redis+sentinel": "redis", "redis+sentinels": "rediss"}


class Topology(abc.ABC):
    """The deployment behind a URL, and where its keys live (see the module's doc).

    One class per kind of deployment: ``SingleRedis``, ``Cluster`` and ``SentinelPrimary``.
    """

    kind: ClassVar[Kind]
    can_move: ClassVar[bool] = True
    """Keys can move to another node (a failover, a resharding): a lost connection may mean the
    map changed, so it is read again."""

    def __init__(self, url: str, node_scheme: str = "redis") -> None:
        self.url = url
        self.node_scheme = node_scheme
        """The scheme of a node's own URL (``rediss`` for TLS)."""
        self.generation = 0
        """Counts the changes of the map: a channel that saw an older one checks where its key lives
        before its next command (one channel noticing a failover moves its siblings too)."""
        self._refreshed = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    # --- where a key lives -------------------------------------------------------------------

    @abc.abstractmethod
    def locate(self, key: str | bytes) -> Address:
        """The address of the node that serves ``key`` now (as last read; no I/O)."""

    def node_url(self, address: Address) -> str:
        """The URL of one node: the user's URL (credentials, TLS, options) with its host and port."""
        parts = urlsplit(self.url)
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        query = {k: v[-1] for k, v in parse_qs(parts.query).items() if not k.startswith("sentinel_")}
        path = self._node_path(parts.path, query)
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        return urlunsplit((self.node_scheme, f"{userinfo}{host}:{address[1]}", path, urlencode(query), ""))

    def _node_path(self, path: str, query: dict[str, str]) -> str:
        return path

    async def refresh(self) -> None:
        """Read where keys live again; concurrent callers share one read. Raises RedisUnavailable."""
        if self._refreshing is None or self._refreshing.done():
            if time.monotonic() - self._refreshed < REFRESH_AT_MOST_EVERY:
                return
            self._refreshing = asyncio.get_running_loop().create_task(self._read_and_note())
        await asyncio.shield(self._refreshing)

    async def _read_and_note(self) -> None:
        try:
            await self._read()
        finally:
            self._refreshed = time.monotonic()

    @abc.abstractmethod
    async def _read(self) -> None:
        """Read the map; raise RedisUnavailable when no node (or sentinel) tells it."""

    # --- clients -------------------------------------------------------------------------------

    @abc.abstractmethod
    def client(self, **options: Any) -> aioredis.Redis | RedisCluster:
        """redis-py's client for this deployment (pooled), with ``options`` for its connections."""

    @abc.abstractmethod
    def sync_client(self, **options: Any) -> redis.Redis | redis.cluster.RedisCluster:
        """A synchronous client (for a thread of its own), with ``options`` for its connections."""


class SingleRedis(Topology):
    """One Redis: every key lives on the URL's node, always."""

    kind = "single"
    can_move = False

    def locate(self, key: str | bytes) -> Address:
        parts = urlsplit(self.url)
        return parts.hostname or "localhost", parts.port or 6379

    def node_url(self, address: Address) -> str:
        return self.url

    async def refresh(self) -> None:
        return  # nothing can move

    async def _read(self) -> None:
        return

    def client(self, **options: Any) -> aioredis.Redis:
        pool = aioredis.BlockingConnectionPool.from_url(self.url, **options)
        return aioredis.Redis.from_pool(pool)  # the client owns and closes the pool

    def sync_client(self, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, **options)


class Cluster(Topology):
    """A Redis Cluster: a key lives on the primary that serves its slot, as CLUSTER SLOTS says."""

    kind = "cluster"

    def __init__(self, url: str, node_scheme: str = "redis", seeds: list[Address] | None = None) -> None:
        super().__init__(url, node_scheme)
        self.seeds = list(seeds or [])
        """Nodes to ask for the map: the URL's, then every primary and replica seen since."""
        self._slots: list[Address] = []

    def locate(self, key: str | bytes) -> Address:
        return self._slots[key_slot(key.encode() if isinstance(key, str) else key)]

    async def _read(self) -> None:
        """Ask the known nodes in turn for CLUSTER SLOTS; the first full answer wins."""
        errors: list[str] = []
        for address in list(self.seeds):
            try:
                reply = await _ask(_probe(self.node_url(address)), "CLUSTER", "SLOTS")
            except (rexc.RedisError, OSError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            slots = _slot_map(reply, default_host=address[0])
            if slots is None:
                errors.append(f"{address[0]}:{address[1]}: not every slot is served")
                continue
            if slots != self._slots:
                self._slots = slots
                self.generation += 1
            self._learn(reply, default_host=address[0])
            return
        raise RedisUnavailable(
            f"cannot read the cluster's slot map from any known node of {redact(self.url)}: "
            + "; ".join(errors[-3:])
        )

    def _learn(self, reply: Any, default_host: str) -> None:
        """Add every node of a CLUSTER SLOTS reply to the seeds (a dead seed is not the only way in)."""
        for entry in reply:
            for node in entry[2:]:
                address = (_host(node[0], default_host), int(node[1]))
                if address not in self.seeds:
                    self.seeds.append(address)

    def client(self, **options: Any) -> RedisCluster:
        for unsupported in ("max_connections", "timeout", "health_check_interval", "retry"):
            options.pop(unsupported, None)
        # Every node seen so far is a way in, not the URL's alone: a client made later (a pool's, the
        # heartbeat's) must not fail because that one node is down then (redis-py adds the URL's).
        nodes = [ClusterNode(host, port) for host, port in self.seeds]
        return RedisCluster.from_url(self.url, startup_nodes=nodes, **options)

    def sync_client(self, **options: Any) -> redis.cluster.RedisCluster:
        options.pop("single_connection_client", None)
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in self.seeds]  # type: ignore[no-untyped-call]
        return redis.cluster.RedisCluster.from_url(self.url, startup_nodes=nodes, **options)


class SentinelPrimary(Topology):
    """A primary that Redis Sentinel manages: every key lives on the primary the sentinels name."""

    kind = "sentinel"

    def __init__(
        self,
        url: str,
        node_scheme: str,
        sentinels: list[Address],
        master: str,
        sentinel_auth: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(url, node_scheme)
        self.sentinels = sentinels
        self.master = master
        self.sentinel_auth = dict(sentinel_auth or {})
        self._primary: Address | None = None

    def locate(self, key: str | bytes) -> Address:
        assert self._primary is not None, "the sentinel's primary is read when the topology is made"
        return self._primary

    def _node_path(self, path: str, query: dict[str, str]) -> str:
        return f"/{query.pop('db', '0')}"  # the database is the URL's ?db=, its path names the primary

    async def _read(self) -> None:
        errors: list[str] = []
        for host, port in self.sentinels:
            try:
                client = aioredis.Redis(host=host, port=port, **self.sentinel_auth, **_PROBE)
                reply = await _ask(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
            except (rexc.RedisError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            if reply:
                primary = (_text(reply[0]), int(reply[1]))
                if primary != self._primary:
                    self._primary = primary
                    self.generation += 1
                return
            errors.append(f"{host}:{port}: does not know a primary named {self.master!r}")
        raise RedisUnavailable(
            f"no sentinel of {redact(self.url)} tells the primary {self.master!r}: " + "; ".join(errors[-3:])
        )

    def client(self, **options: Any) -> aioredis.Redis:
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            self.sentinels, sentinel_kwargs=self._sentinel_kwargs(options), **self._node_auth()
        )
        options.pop("timeout", None)
        options.pop("health_check_interval", None)
        client: aioredis.Redis = sentinel.master_for(self.master, **options, **self._node_options())
        return client

    def sync_client(self, **options: Any) -> redis.Redis:
        options.pop("single_connection_client", None)
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            self.sentinels, sentinel_kwargs=self._sentinel_kwargs(options), **self._node_auth()
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            self.master, **options, **self._node_options()
        )
        return client

    def _node_auth(self) -> dict[str, Any]:
        parts = urlsplit(self.url)
        auth: dict[str, Any] = {}
        if parts.username:
            auth["username"] = unquote(parts.username)
        if parts.password:
            auth["password"] = unquote(parts.password)
        return auth

    def _node_options(self) -> dict[str, Any]:
        """The primary's connection options from a sentinel URL: its db, and TLS with the URL's
        ``ssl_*`` options (``ssl_ca_certs`` for a private CA), as ``node_url`` gives the channels."""
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.url).query).items()}
        node: dict[str, Any] = {"db": int(query.get("db", 0))}
        if self.node_scheme == "rediss":
            node["ssl"] = True
            node.update({k: v for k, v in query.items() if k.startswith("ssl_")})
        return node

    def _sentinel_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        timeouts: dict[str, Any] = {
            k: options[k] for k in ("socket_timeout", "socket_connect_timeout") if k in options
        }
        return {**timeouts, **self.sentinel_auth}


TLS_FILES = {
    "ssl_ca_certs": "CA certificates", "ssl_certfile": "client certificate", "ssl_keyfile": "private key",
}  # fmt: skip
"""The URL's options that name a file of TLS material, and what each holds (PEM)."""


def check_tls_files(url: str) -> None:
    """ConfigError naming the option and the path when a TLS file of ``url`` cannot be read or loaded.

    redis-py reads them on its first connection, where a missing file looks
    like an unreachable server ("Error 2 connecting to ...: No such file or
    directory"); they are loaded here once, as its connections would.
    """
    options = tls_options(url)
    for name, holds in TLS_FILES.items():
        path = options.get(name)
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"cannot read the TLS {holds} file {name}={path} of {redact(url)}: {exc.strerror or exc}"
            ) from None
    ca, cert, key = (options.get(name) for name in TLS_FILES)
    if ca is None and cert is None and key is None:
        return  # nothing to load: no context (OpenSSL's set-up costs every worker a MiB otherwise)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"the TLS option ssl_ca_certs={ca} of {redact(url)} names a file without a PEM "
                f"certificate ({exc.reason or exc})"
            ) from None
    if key is not None and cert is None:
        raise ConfigError(f"{redact(url)} has ssl_keyfile={key} without ssl_certfile: give both")
    if cert is not None:
        password = options.get("ssl_password", "")
        try:
            # A callable: an encrypted key without ssl_password fails here, not at a password prompt.
            context.load_cert_chain(cert, key, password=lambda: password)
        except ssl.SSLError as exc:
            pair = f"ssl_certfile={cert}" + (f" and ssl_keyfile={key}" if key else "")
            raise ConfigError(
                f"the TLS options {pair} of {redact(url)} do not hold a PEM certificate and its "
                f"private key ({exc.reason or exc}; an encrypted key needs ssl_password)"
            ) from None


async def discover(url: str) -> Topology:
    """What runs behind ``url``; raises RedisUnavailable (unreachable) or ConfigError (a bad URL, or
    a TLS file that cannot be read)."""
    check_tls_files(url)
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        sentinel = _sentinel_topology(url)
        await sentinel.refresh()
        return sentinel
    try:
        info = await _ask(_probe(url), "INFO", "cluster")  # redis-py parses it into a dict
        enabled = str(info.get("cluster_enabled", 0)) == "1"
    except rexc.NoPermissionError:  # an ACL user without INFO: ask the cluster itself
        try:
            await _ask(_probe(url), "CLUSTER", "MYID")
            enabled = True
        except rexc.NoPermissionError as exc:
            raise ConfigError(
                f"the Redis user of {redact(url)} may run neither INFO nor CLUSTER MYID, so it cannot "
                "be told whether this is a Redis Cluster: allow +info (or +cluster|myid and "
                "+cluster|slots on a cluster)"
            ) from exc
        except rexc.ResponseError:  # "cluster support disabled"
            enabled = False
        except (rexc.RedisError, OSError) as exc:
            raise unreachable(url, exc) from exc
    except (rexc.RedisError, OSError) as exc:
        raise unreachable(url, exc) from exc
    if not enabled:
        return SingleRedis(url)
    if parts.path not in ("", "/", "/0") or any(q.startswith("db=") for q in parts.query.split("&")):
        raise ConfigError(
            f"{redact(url)} is a Redis Cluster, which has only database 0: remove the database number"
        )
    seed = (parts.hostname or "localhost", parts.port or 6379)
    cluster = Cluster(url, node_scheme=parts.scheme, seeds=[seed])
    await cluster.refresh()
    return cluster


def unreachable(url: str, exc: Exception) -> RedisUnavailable:
    """The error for a first connection to ``url`` that failed with ``exc`` (password hidden)."""
    if isinstance(exc, rexc.AuthenticationError):
        return RedisUnavailable(f"Redis at {redact(url)} refused the credentials: {exc}")
    if isinstance(exc, rexc.ResponseError):
        return RedisUnavailable(f"Redis at {redact(url)} refused the connection: {exc}")
    return RedisUnavailable(
        f"cannot reach Redis at {redact(url)}: {exc}; is it running? (set --redis or TITAN_REDIS_URL)"
    )


def _sentinel_topology(url: str) -> SentinelPrimary:
    parts = urlsplit(url)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    sentinels: list[Address] = []
    usage = "redis+sentinel://[user:password@]host:26379[,host:26379...]/<primary name>[?db=N]"
    for item in hosts.split(","):
        if item.startswith("["):  # [IPv6]:port
            host, _, port = item[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host or not (port or "26379").isdigit() or not 0 < int(port or 26379) < 65536:
            raise ConfigError(f"{redact(url)}: bad sentinel address {item!r}: use {usage}")
        sentinels.append((host, int(port or 26379)))
    names = [n for n in parts.path.split("/") if n]
    if len(names) != 1:
        raise ConfigError(f"{redact(url)}: a sentinel URL names the sentinels and one primary: {usage}")
    master = names[0]
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if not query.get("db", "0").isdigit():
        raise ConfigError(f"{redact(url)}: db must be a number, got {query['db']!r}")
    auth = {
        k.removeprefix("sentinel_"): query[k]
        for k in ("sentinel_username", "sentinel_password")
        if k in query
    }
    return SentinelPrimary(url, SENTINEL_SCHEMES[parts.scheme], sentinels, master, auth)


_PROBE: dict[str, Any] = {
    "decode_responses": False, "protocol": 2, "socket_timeout": PROBE_TIMEOUT,
    "socket_connect_timeout": PROBE_TIMEOUT, "single_connection_client": True,
}  # fmt: skip
"""A probe's connection: its own, bounded by PROBE_TIMEOUT, replies as RESP2 values."""


def _probe(url: str) -> aioredis.Redis:
    """A probe connection to the node at ``url``, without the database number: a cluster
    node refuses SELECT, and what it is must be known before that can be said clearly."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):  # unix:// keeps its path: the socket's
        query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("db="))
        url = urlunsplit(parts._replace(path="", query=query))
    return aioredis.Redis.from_url(url, **_PROBE)


async def _ask(client: aioredis.Redis, *command: Any) -> Any:
    """Send one command on a probe connection, then close it."""
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call, unused-ignore]
    finally:
        await client.aclose()


def _slot_map(reply: Any, default_host: str) -> list[Address] | None:
    """The primary of each slot from a CLUSTER SLOTS reply; None when some slot has none."""
    slots: list[Address | None] = [None] * SLOTS
    for entry in reply:
        start, end, primary = int(entry[0]), int(entry[1]), entry[2]
        address = (_host(primary[0], default_host), int(primary[1]))
        for slot in range(start, end + 1):
            slots[slot] = address
    if any(a is None for a in slots):
        return None
    return [a for a in slots if a is not None]


def _host(value: Any, default: str) -> str:
    """A node's host as CLUSTER SLOTS tells it (empty or '?' means the one asked)."""
    host = _text(value)
    return default if host in ("", "?") else host


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
