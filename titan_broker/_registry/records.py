"""The registry: which services exist, which of their workers are alive, and what each serves.

A worker is alive while its record (a WorkerInfo: a hash with a TTL
refreshed by its heartbeat) exists. Ids left in a service's worker set by
workers whose record expired are pruned when read. A service's versions
are read off its live records, so every version serving during a rolling
upgrade is seen, each with its own methods.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster

from .._redis.connection import Redis, text
from .._wire.keys import USER, Keys, shard_scopes, shards_of
from .latency import LatencyHistogram


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker as the registry describes it (``pm.workers_of(service)``, ``titan workers``).

    The worker writes its record when it registers and refreshes it at each
    heartbeat, so what it says (load, calls, health, latency) is at most a
    heartbeat old, and the record disappears within the heartbeat TTL of the
    worker's death. In Redis it is the hash ``<ns>:{<service>}:worker:<id>``
    (see the protocol): numbers are decimal strings (times with 3 decimals);
    ``health``, ``latency``, ``methods`` and ``metrics`` are JSON; ``health``
    and ``metrics_port`` are absent when the worker has none.
    """

    worker_id: str
    service: str
    version: str
    host: str
    pid: int
    status: str
    in_flight: int
    concurrency: int
    calls: int
    errors: int
    started_at: float
    heartbeat_at: float
    health: dict[str, Any] | None = None
    """The last @health_check report (status, checks, details, at); None without a @health_check."""
    unhealthy_streak: int = 0
    latency_counts: dict[str, int] = field(default_factory=dict)
    """The worker's latency histogram, sparse: call count per bucket (the record's field ``latency``)."""
    methods: list[dict[str, Any]] = field(default_factory=list)
    """What this worker serves: one description per @public method (name, signature, decorators)."""
    metrics_port: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """Per @metric method: calls, errors and latency percentiles."""
    cpu_percent: float | None = None
    """The worker process's CPU use since its previous heartbeat (100 = one core); None if unknown."""
    rss: int | None = None
    """The worker process's resident memory in bytes; None if unknown."""

    @property
    def latency(self) -> LatencyHistogram:
        return LatencyHistogram.from_dict(self.latency_counts)

    @property
    def healthy(self) -> bool:
        return self.health is None or self.health.get("status") != "unhealthy"

    @property
    def method_names(self) -> frozenset[str]:
        return frozenset(str(m.get("name")) for m in self.methods)

    def to_fields(self, *, heartbeat_only: bool = False) -> dict[str, str]:
        """The hash's fields; only those a heartbeat refreshes when ``heartbeat_only``."""
        fields = {
            "status": self.status,
            "in_flight": str(self.in_flight),
            "calls": str(self.calls),
            "errors": str(self.errors),
            "heartbeat_at": f"{self.heartbeat_at:.3f}",
            "latency": json.dumps(self.latency_counts),
            "unhealthy_streak": str(self.unhealthy_streak),
            "metrics": json.dumps(self.metrics),
            **({"health": json.dumps(self.health)} if self.health is not None else {}),
            **({"cpu_percent": f"{self.cpu_percent:.1f}"} if self.cpu_percent is not None else {}),
            **({"rss": str(self.rss)} if self.rss is not None else {}),
        }
        if heartbeat_only:
            return fields
        return {
            "service": self.service,
            "version": self.version,
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": str(self.pid),
            "concurrency": str(self.concurrency),
            **({"metrics_port": str(self.metrics_port)} if self.metrics_port is not None else {}),
            "started_at": f"{self.started_at:.3f}",
            "methods": json.dumps(self.methods),
            **fields,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes] | Mapping[str, str]) -> WorkerInfo:
        """Parse the hash as HGETALL returns it; a field that is missing reads as '?', 0 or empty."""
        r = {text(k): text(v) for k, v in fields.items()}
        return cls(
            worker_id=r.get("worker_id", "?"),
            service=r.get("service", "?"),
            version=r.get("version", "?"),
            host=r.get("host", "?"),
            pid=int(r.get("pid", 0)),
            status=r.get("status", "?"),
            in_flight=int(r.get("in_flight", 0)),
            concurrency=int(r.get("concurrency", 0)),
            calls=int(r.get("calls", 0)),
            errors=int(r.get("errors", 0)),
            started_at=float(r.get("started_at", 0)),
            heartbeat_at=float(r.get("heartbeat_at", 0)),
            health=json.loads(r["health"]) if "health" in r else None,
            unhealthy_streak=int(r.get("unhealthy_streak", 0)),
            latency_counts=json.loads(r.get("latency", "{}")),
            methods=json.loads(r.get("methods", "[]")),
            metrics_port=int(r["metrics_port"]) if "metrics_port" in r else None,
            metrics=json.loads(r.get("metrics", "{}")),
            cpu_percent=float(r["cpu_percent"]) if "cpu_percent" in r else None,
            rss=int(r["rss"]) if "rss" in r else None,
        )

    @classmethod
    def from_record(cls, record: Mapping[bytes, bytes]) -> WorkerInfo:
        """Same as ``from_fields`` (the name earlier releases used)."""
        return cls.from_fields(record)

    def to_dict(self) -> dict[str, Any]:
        """For JSON output: the record without its method descriptions, latency as percentiles."""
        data = asdict(self)
        data.pop("latency_counts")
        data.pop("methods")
        data["latency_ms"] = self.latency.summary()
        return data


@dataclass(frozen=True)
class VersionInfo:
    """One version of a service that is serving now: the methods its workers offer, and the workers."""

    version: str
    methods: list[dict[str, Any]]
    """As its most recently started worker describes them."""
    workers: list[WorkerInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "methods": self.methods,
            "workers": [w.worker_id for w in self.workers],
        }


def serving_versions(workers: list[WorkerInfo]) -> list[VersionInfo]:
    """The versions these live workers serve, in version order (numbers compared as numbers)."""
    by_version: dict[str, list[WorkerInfo]] = {}
    for w in workers:
        by_version.setdefault(w.version, []).append(w)
    versions = []
    for version in sorted(by_version, key=_version_key):
        members = by_version[version]
        newest = max(members, key=lambda w: w.started_at)
        versions.append(VersionInfo(version, newest.methods, members))
    return versions


def _version_key(version: str) -> list[tuple[int, int, str]]:
    """'1.10.0' after '1.9.2'; a part that is not a number sorts after the numbers."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|[^\d.]+", version)]


@dataclass(frozen=True)
class ServiceInfo:
    """A service and its live workers, grouped by the version each serves.

    ``version``, ``description`` and ``methods`` are what the service's last
    registered worker described (kept for compatibility: during a rolling
    upgrade that may be either version). ``versions`` is what is serving
    now: every version that has a live worker, each with its own methods
    and workers, in version order; empty when no worker lives.
    """

    name: str
    version: str
    description: str
    methods: list[dict[str, Any]]
    workers: list[WorkerInfo] = field(default_factory=list)
    versions: list[VersionInfo] = field(default_factory=list)
    shards: int = 1
    """The slots its calls spread over (``@process(shards=...)``)."""

    @property
    def hosts(self) -> dict[str, int]:
        """Live workers per host."""
        counts: dict[str, int] = {}
        for w in self.workers:
            counts[w.host] = counts.get(w.host, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "methods": self.methods,
            "shards": self.shards,
            "hosts": self.hosts,
            "workers": [w.to_dict() for w in self.workers],
            "versions": [v.to_dict() for v in self.versions],
        }


async def read_workers(redis: Redis, keys: Keys, service: str, ids: list[str]) -> list[WorkerInfo]:
    """The records of these workers of ``service`` that are alive."""
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for wid in ids:
            pipe.hgetall(keys.worker(service, wid))
        records = await pipe.execute()
    return [WorkerInfo.from_fields(r) for r in records if r]


async def remove_worker(redis: Redis, keys: Keys, service: str, worker_id: str) -> None:
    """Take a worker out of the registry now (its record and its id), rather than at its TTL."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker(service, worker_id))
        pipe.srem(keys.workers(service), worker_id)
        await pipe.execute()


async def list_workers(redis: Redis, keys: Keys, service: str) -> list[WorkerInfo]:
    """The live workers of ``service``; prunes ids whose record has expired."""
    ids = sorted(text(w) for w in await redis.smembers(keys.workers(service)))
    live = await read_workers(redis, keys, service, ids)
    dead = set(ids) - {w.worker_id for w in live}
    if dead:
        # Pruning is housekeeping: a caller whose ACL makes the set read-only just skips it.
        with contextlib.suppress(rexc.NoPermissionError):
            await redis.srem(keys.workers(service), *dead)
    return live


async def list_services(redis: Redis, keys: Keys, *, live_only: bool = True) -> list[ServiceInfo]:
    """Every known service with its live workers and the versions they serve.

    Only the services with a live worker when ``live_only``.
    """
    raw = await redis.hgetall(keys.services)
    services: list[ServiceInfo] = []
    for name_b, desc_b in sorted(raw.items()):
        desc = json.loads(desc_b)
        name = text(name_b)
        workers = await list_workers(redis, keys, name)
        if live_only and not workers:
            continue
        services.append(
            ServiceInfo(
                name=name,
                version=str(desc.get("version", "?")),
                description=str(desc.get("description", "")),
                methods=list(desc.get("methods", [])),
                workers=workers,
                versions=serving_versions(workers),
                shards=await shard_count(redis, keys, name),
            )
        )
    return services


@dataclass(frozen=True)
class QueueInfo:
    """The calls of one service: waiting, running, dead-lettered (over all its shards)."""

    service: str
    backlog: int
    """Entries in the service's streams: waiting plus running."""
    pending: int
    """Delivered to a worker and not yet acknowledged (running, or held by a dead worker)."""
    dead_letters: int
    shards: tuple[QueueInfo, ...] = ()
    """A sharded service's queue per shard, the first shard first (empty for one shard)."""

    @property
    def waiting(self) -> int:
        return max(0, self.backlog - self.pending)

    def to_dict(self) -> dict[str, Any]:
        found = {**asdict(self), "waiting": self.waiting}
        del found["shards"]
        if self.shards:  # a sharded service's: each shard's after the totals
            found["shards"] = [shard.to_dict() for shard in self.shards]
        return found

    @classmethod
    def summed(cls, service: str, shards: list[QueueInfo]) -> QueueInfo:
        """A service's queue from its shards' (one shard: that shard's)."""
        if len(shards) == 1:
            return shards[0]
        return cls(
            service,
            sum(s.backlog for s in shards),
            sum(s.pending for s in shards),
            sum(s.dead_letters for s in shards),
            tuple(shards),
        )


async def shard_count(redis: Redis, keys: Keys, service: str) -> int:
    """How many shards ``service``'s workers registered (1 for a service not sharded or not known)."""
    return shards_of(await redis.hget(keys.config(service), "shards"))


async def service_scopes(redis: Redis, keys: Keys, service: str) -> list[str]:
    """The scopes of ``service``'s shards (its own only, for a service not sharded or not known)."""
    return shard_scopes(service, await shard_count(redis, keys, service))


async def registered_users(redis: Redis, keys: Keys, service: str) -> list[str]:
    """The caller users registered for ``service`` (its ``users`` set), each with request streams of
    its own; names no rule could be written for are left out."""
    return user_names(await redis.smembers(keys.users(service)))


def user_names(members: Any) -> list[str]:
    """The user names of a ``users`` set as SMEMBERS answered, sorted; names no rule could be
    written for are left out, and so is everything when the answer is an error (a refusal)."""
    if not isinstance(members, (set, list)):
        return []
    return sorted(u for u in (text(m) for m in members) if USER.fullmatch(u))


def request_streams(keys: Keys, scope: str, users: list[str]) -> list[str]:
    """One shard's request streams that any worker reads: the shared one, then each user's."""
    return [keys.calls(scope), *(keys.user_calls(scope, user) for user in users)]


async def backlog(redis: Redis, keys: Keys, service: str) -> int:
    """Calls waiting or running in ``service``'s streams, every shard's and every registered user's."""
    scopes = await service_scopes(redis, keys, service)
    return await queued(redis, keys, scopes, await registered_users(redis, keys, service))


async def queued(redis: Redis, keys: Keys, scopes: list[str], users: Sequence[str] = ()) -> int:
    """Calls waiting or running in these shards' streams (each registered user's in them too), in one
    round trip."""
    streams = [stream for scope in scopes for stream in request_streams(keys, scope, list(users))]
    if not streams:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
        return sum(int(n) for n in await pipe.execute())


async def queue_info(redis: Redis, keys: Keys, service: str) -> QueueInfo:
    """Backlog, pending and dead letters of ``service``, per shard and in all (a shard's figures
    count its registered users' streams too)."""
    shards = []
    users = await registered_users(redis, keys, service)
    for scope in await service_scopes(redis, keys, service):
        streams = request_streams(keys, scope, users)
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
                pipe.xpending(stream, "workers")
            pipe.xlen(keys.dead(scope))
            *figures, dead = await pipe.execute(raise_on_error=False)
        lengths, summaries = figures[::2], figures[1::2]
        for value in (*lengths, dead):
            if isinstance(value, Exception):
                raise value
        # An error in place of a summary: no stream or no group yet, so nothing pending.
        pending = sum(int(s["pending"]) for s in summaries if isinstance(s, dict))
        shards.append(QueueInfo(scope, sum(int(n) for n in lengths), pending, int(dead)))
    return QueueInfo.summed(service, shards)


RETIRED_AFTER = 3600.0
"""Seconds a service may have no live worker before it counts as retired rather than down."""


async def idle_since(redis: Redis, keys: Keys, service: str) -> tuple[float, float]:
    """(since, now): since when ``service`` has had no live worker, and now, in seconds of Redis's clock.

    Call it for a service found with no live worker. The first reader to find it so marks the
    moment (``Keys.idle``); the next worker to register deletes the mark. A reader whose ACL
    forbids the write gets ``since == now``.
    """
    key = keys.idle(service)
    if isinstance(redis, RedisCluster):  # the clock of the node that holds the mark
        seconds, micros = await redis.time(target_nodes=redis.get_node_from_key(key))
    else:
        seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    try:
        await redis.set(key, str(now_ms), nx=True)
    except rexc.NoPermissionError:
        return now_ms / 1000, now_ms / 1000
    raw = await redis.get(key)
    mark = text(raw) if raw is not None else ""
    since_ms = int(mark) if mark.isdigit() else now_ms
    return min(since_ms, now_ms) / 1000, now_ms / 1000


async def forget_service(redis: Redis, keys: Keys, service: str) -> None:
    """Remove a service with no live worker from the registry: its directory entry, worker set, idle
    mark, calls, dead letters, delayed calls and schedule. Its jobs expire as they would."""
    scopes = await service_scopes(redis, keys, service)
    users = await registered_users(redis, keys, service)
    await redis.hdel(keys.services, service)
    async with redis.pipeline(transaction=True) as pipe:  # the service's keys: one slot
        pipe.delete(keys.workers(service), keys.idle(service), keys.affinity(service), keys.config(service))
        pipe.delete(keys.calls(service), keys.dead(service), keys.delayed(service), keys.schedule(service))
        if users:  # the registered users' requests (the set itself is the operator's: kept)
            pipe.delete(*request_streams(keys, service, users)[1:])
        await pipe.execute()
    for scope in scopes[1:]:  # each other shard: a slot of its own
        await redis.delete(keys.calls(scope), keys.dead(scope), keys.delayed(scope), keys.config(scope))
        if users:
            await redis.delete(*request_streams(keys, scope, users)[1:])


async def known_services(redis: Redis, keys: Keys) -> list[str]:
    """Every service that ever registered in this namespace."""
    return sorted(text(name) for name in await redis.hkeys(keys.services))
