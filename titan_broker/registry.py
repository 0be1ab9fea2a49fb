"""Reading the registry: which services exist and which of their workers are alive.

A worker is alive while its record (a hash with a TTL refreshed by its
heartbeat) exists. Ids left in a service's worker set by workers whose
record expired are pruned when read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .connection import Redis, text
from .keys import Keys
from .stats import LatencyHistogram


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker, as its registry record shows it."""

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
    unhealthy_streak: int = 0
    latency_counts: dict[str, int] = field(default_factory=dict)
    """The worker's latency histogram, sparse (see stats.LatencyHistogram)."""

    @property
    def latency(self) -> LatencyHistogram:
        return LatencyHistogram.from_dict(self.latency_counts)

    @property
    def healthy(self) -> bool:
        return self.health is None or self.health.get("status") != "unhealthy"

    @classmethod
    def from_record(cls, record: dict[bytes, bytes]) -> WorkerInfo:
        r = {k.decode(): v.decode() for k, v in record.items()}
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
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latency_counts")
        data["latency_ms"] = self.latency.summary()
        return data


@dataclass(frozen=True)
class ServiceInfo:
    """A service: what its last registered worker described, and its live workers."""

    name: str
    version: str
    description: str
    methods: list[dict[str, Any]]
    workers: list[WorkerInfo] = field(default_factory=list)

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
            "hosts": self.hosts,
            "workers": [w.to_dict() for w in self.workers],
        }


async def read_workers(redis: Redis, keys: Keys, service: str, ids: list[str]) -> list[WorkerInfo]:
    """The records of these workers of ``service`` that are alive."""
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for wid in ids:
            pipe.hgetall(keys.worker(service, wid))
        records = await pipe.execute()
    return [WorkerInfo.from_record(r) for r in records if r]


async def list_workers(redis: Redis, keys: Keys, service: str) -> list[WorkerInfo]:
    """The live workers of ``service``; prunes ids whose record has expired."""
    ids = sorted(text(w) for w in await redis.smembers(keys.workers(service)))
    live = await read_workers(redis, keys, service, ids)
    dead = set(ids) - {w.worker_id for w in live}
    if dead:
        await redis.srem(keys.workers(service), *dead)
    return live


async def list_services(redis: Redis, keys: Keys, *, live_only: bool = True) -> list[ServiceInfo]:
    """Every known service with its live workers; only those with a live worker when ``live_only``."""
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
            )
        )
    return services


@dataclass(frozen=True)
class QueueInfo:
    """The calls of one service: waiting, running, dead-lettered."""

    service: str
    backlog: int
    """Entries in the service's stream: waiting plus running."""
    pending: int
    """Delivered to a worker and not yet acknowledged (running, or held by a dead worker)."""
    dead_letters: int

    @property
    def waiting(self) -> int:
        return max(0, self.backlog - self.pending)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "waiting": self.waiting}


async def queue_info(redis: Redis, keys: Keys, service: str) -> QueueInfo:
    """Backlog, pending and dead letters of ``service``."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.calls(service))
        pipe.xlen(keys.dead(service))
        backlog, dead = await pipe.execute()
    try:
        summary = await redis.xpending(keys.calls(service), "workers")
        pending = int(summary["pending"])
    except Exception:  # no stream or no group yet
        pending = 0
    return QueueInfo(service, int(backlog), pending, int(dead))


async def known_services(redis: Redis, keys: Keys) -> list[str]:
    """Every service that ever registered in this namespace."""
    return sorted(text(name) for name in await redis.hkeys(keys.services))
