"""The whole namespace at once, read again and again at a bounded cost: what a dashboard shows.

``RegistryReader.read`` takes three round trips whatever the size of the
namespace (four when a service is sharded), and no SCAN or KEYS: the
services hash; one pipeline with each service's worker set, shard count,
queue lengths, pending summary and job count (then one with the other
shards' of the sharded services); one pipeline with each worker's record. A worker's fields that never change
(host, pid, methods...) are read once with HGETALL, then only the fields its
heartbeat refreshes (HMGET), so the bytes per read stay small too. Ids of
workers whose record expired are pruned from their set, as ``list_workers`` does.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from redis import exceptions as rexc

from .._redis.connection import Redis, text
from .._wire.keys import GROUP, Keys, shard_scopes, shards_of
from .health import ServiceHealth, aggregate
from .records import QueueInfo, ServiceInfo, WorkerInfo, serving_versions, user_names

HEARTBEAT_FIELDS: tuple[str, ...] = (
    "status", "in_flight", "calls", "errors", "heartbeat_at", "latency", "unhealthy_streak", "metrics",
    "health", "cpu_percent", "rss",
)  # fmt: skip
"""The record's fields a heartbeat rewrites (``WorkerInfo.to_fields(heartbeat_only=True)``)."""


@dataclass(frozen=True)
class ServiceOverview:
    """One service as the registry shows it now."""

    info: ServiceInfo
    queue: QueueInfo
    health: ServiceHealth
    jobs: int
    """Job ids in the service's index (jobs kept, whatever their state)."""
    delayed: int
    """Calls and jobs waiting for their time (delays, @retry backoffs)."""


@dataclass(frozen=True)
class Overview:
    """Every service of a namespace, and what reading them cost."""

    services: list[ServiceOverview] = field(default_factory=list)
    commands: int = 0
    """Redis commands sent for this read."""
    round_trips: int = 0
    seconds: float = 0.0
    """Wall time of the read, parsing included."""

    @property
    def workers(self) -> list[WorkerInfo]:
        return [w for s in self.services for w in s.info.workers]


class RegistryReader:
    """Reads a namespace's registry repeatedly (see the module's doc); one per reading process."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._static: dict[tuple[str, str], WorkerInfo] = {}

    async def read(self, redis: Redis) -> Overview:
        started = time.perf_counter()
        keys = self.keys
        described = {text(k): _json(v) for k, v in (await redis.hgetall(keys.services)).items()}
        names = sorted(described)
        commands = 1
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.smembers(keys.workers(name))
                pipe.zcard(keys.jobs(name))
                pipe.hget(keys.config(name), "shards")
                pipe.smembers(keys.users(name))
                _shard_figures(pipe, keys, name)
            replies: list[Any] = await pipe.execute(raise_on_error=False) if names else []
        commands += len(replies)
        # Each service's replies: its workers, jobs, shard count and registered users, then four per
        # shard: the first shard's here, a sharded service's others in one more round trip, with two
        # per registered user's stream in each shard.
        rows = {name: replies[i * 8 : i * 8 + 8] for i, name in enumerate(names)}
        scopes = {name: shard_scopes(name, shards_of(_raw(rows[name][2]))) for name in names}
        users = {name: user_names(rows[name][3]) for name in names}
        sharded = [name for name in names if len(scopes[name]) > 1 or users[name]]
        if sharded:
            async with redis.pipeline(transaction=False) as pipe:
                for name in sharded:
                    for scope in scopes[name][1:]:
                        _shard_figures(pipe, keys, scope)
                    for scope in scopes[name]:
                        for user in users[name]:
                            pipe.xlen(keys.user_calls(scope, user))
                            pipe.xpending(keys.user_calls(scope, user), GROUP)
                more: list[Any] = await pipe.execute(raise_on_error=False)
            commands += len(more)
            at = 0
            for name in sharded:
                count = (4 + 2 * len(users[name])) * len(scopes[name]) - 4
                rows[name], at = rows[name] + more[at : at + count], at + count
        wanted: list[tuple[str, str]] = []
        for name in names:
            members = rows[name][0]
            if isinstance(members, (set, list)):
                wanted.extend((name, text(w)) for w in sorted(members, key=text))
        records: list[Any] = []
        if wanted:
            async with redis.pipeline(transaction=False) as pipe:
                for service, wid in wanted:
                    if (service, wid) in self._static:
                        pipe.hmget(keys.worker(service, wid), list(HEARTBEAT_FIELDS))
                    else:
                        pipe.hgetall(keys.worker(service, wid))
                records = await pipe.execute(raise_on_error=False)
            commands += len(wanted)
        live: dict[str, list[WorkerInfo]] = {name: [] for name in names}
        dead: dict[str, list[str]] = {}
        seen: set[tuple[str, str]] = set()
        for (service, wid), record in zip(wanted, records, strict=True):
            try:
                info = self._worker(service, wid, record)
            except (ValueError, TypeError, KeyError):  # a half-written record: read it whole next time
                self._static.pop((service, wid), None)
                continue
            if info is None:
                dead.setdefault(service, []).append(wid)
                continue
            seen.add((service, wid))
            live[service].append(info)
        for gone in set(self._static) - seen:
            del self._static[gone]
        if dead:
            # Pruning is housekeeping: a reader whose ACL makes the sets read-only just skips it.
            with contextlib.suppress(rexc.NoPermissionError):
                async with redis.pipeline(transaction=False) as pipe:
                    for service, ids in dead.items():
                        pipe.srem(keys.workers(service), *ids)
                    await pipe.execute(raise_on_error=False)
            commands += len(dead)
        services = []
        for name in names:
            row = rows[name]
            desc = described[name]
            workers = live[name]
            described_service = ServiceInfo(
                name=name,
                version=str(desc.get("version", "?")),
                description=str(desc.get("description", "")),
                methods=list(desc.get("methods", [])),
                workers=workers,
                versions=serving_versions(workers),
                shards=len(scopes[name]),
            )
            shards, delayed = [], 0
            per_user = row[4 + 4 * len(scopes[name]) :]  # two per user in each shard, the first shard first
            width = 2 * len(users[name])
            for k, scope in enumerate(scopes[name]):
                calls, dead_letters, summary, waiting = row[4 + 4 * k : 8 + 4 * k]
                summaries = [summary, *per_user[k * width + 1 : (k + 1) * width : 2]]
                pending = sum(int(s["pending"]) if isinstance(s, dict) else 0 for s in summaries)
                calls = _int(calls) + sum(_int(n) for n in per_user[k * width : (k + 1) * width : 2])
                shards.append(QueueInfo(scope, calls, pending, _int(dead_letters)))
                delayed += _int(waiting)
            queue = QueueInfo.summed(name, shards)
            services.append(
                ServiceOverview(described_service, queue, aggregate(name, workers), _int(row[1]), delayed)
            )
        rounds = 1 + (1 if names else 0) + (1 if sharded else 0) + (1 if wanted else 0) + (1 if dead else 0)
        return Overview(services, commands, rounds, time.perf_counter() - started)

    def _worker(self, service: str, wid: str, record: Any) -> WorkerInfo | None:
        """The worker from this read's reply (its whole record, or its heartbeat fields on top of the
        record read before); None when it is gone."""
        if isinstance(record, dict):
            if not record:
                return None
            info = WorkerInfo.from_fields(record)
            self._static[(service, wid)] = info
            return info
        if not isinstance(record, list) or record[0] is None:  # no status: the record expired
            return None
        fresh = WorkerInfo.from_fields(
            {name: v for name, v in zip(HEARTBEAT_FIELDS, record, strict=True) if v is not None}
        )
        return replace(
            self._static[(service, wid)], status=fresh.status, in_flight=fresh.in_flight, calls=fresh.calls,
            errors=fresh.errors, heartbeat_at=fresh.heartbeat_at, latency_counts=fresh.latency_counts,
            unhealthy_streak=fresh.unhealthy_streak, metrics=fresh.metrics, health=fresh.health,
            cpu_percent=fresh.cpu_percent, rss=fresh.rss,
        )  # fmt: skip


def _shard_figures(pipe: Any, keys: Keys, scope: str) -> None:
    """Queue the four figures of one shard: its calls, its dead letters, its pending summary, its
    delayed calls."""
    pipe.xlen(keys.calls(scope))
    pipe.xlen(keys.dead(scope))
    pipe.xpending(keys.calls(scope), GROUP)  # no stream or group yet: an error, read as 0
    pipe.zcard(keys.delayed(scope))


def _raw(value: Any) -> bytes | None:
    return value if isinstance(value, bytes) else None


def _json(raw: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int) else 0
