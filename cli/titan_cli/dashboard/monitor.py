"""The dashboard's one reader: it reads the registry every ``interval`` and keeps what the page shows.

However many pages are open, one ``Monitor`` per dashboard process reads
Redis; each refresh becomes one JSON snapshot, serialized once and handed to
every open page. Rates and latency percentiles are derived from the workers'
own counters (calls, errors, the latency histogram), as differences between
two refreshes; their history (``HISTORY`` seconds) lives in this process's
memory only, so a dashboard started later has its own, shorter, history.
Events are derived from the registry too (a worker appearing, changing status,
its health changing, disappearing): a ProcessManager's events stay in its process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import anyio

from titan_broker._calling import Client, JobState, JobStatus, list_jobs, status_of
from titan_broker._config import redact
from titan_broker._redis import text
from titan_broker._registry import LatencyHistogram, Overview, RegistryReader, ServiceOverview, WorkerInfo

logger = logging.getLogger(__name__)

HISTORY = 600.0
"""Seconds of calls/s, errors/s and latency kept per service."""
GONE_KEEP = 60.0
"""Seconds a gone worker stays on the page, greyed out, before it is dropped."""
JOBS_EVERY = 3.0
"""Seconds between two reads of the jobs and schedules (they change more slowly than the workers)."""
JOBS_PER_SERVICE = 50
"""The latest jobs read per service: the counts by state are over these."""
JOB_SERVICES_PER_READ = 25
"""At most this many services' jobs per jobs read, in turn: the cost stays bounded with many services."""
READ_TIMEOUT = 5.0
EVENTS_KEPT = 300


@dataclass
class _Seen:
    """A worker as the previous refresh saw it."""

    info: WorkerInfo
    at: float


class Monitor:
    """Reads the registry of one namespace and publishes snapshots (see the module's doc)."""

    def __init__(
        self, url: str | None, namespace: str | None, *, interval: float = 1.0, secrets: tuple[str, ...] = ()
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.interval = interval
        self.client: Client | None = None
        self.actions = False
        self._secrets = tuple(s for s in secrets if s)
        self._seen: dict[tuple[str, str], _Seen] = {}
        self._gone: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        self._history: dict[str, deque[list[float | None]]] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self._health: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._read_once = False
        self._reconnected = False
        """The next read is the first since Redis came back: a worker missing may be lost with its data."""
        self._jobs: dict[str, Any] = {"services": {}, "latest": [], "failed": [], "schedules": []}
        self._jobs_at = 0.0
        self._jobs_turn = 0
        self._redis: dict[str, Any] = {"ok": False, "since": time.time(), "error": "connecting"}
        self._cost: dict[str, Any] = {}
        self._reader: RegistryReader | None = None
        self.snapshot = self._encode(self._build(None))
        self._changed = asyncio.Event()
        self.refreshes = 0

    @property
    def shown_url(self) -> str:
        return redact(
            self.client.url if self.client is not None else (self.url or "redis://127.0.0.1:6379/0")
        )

    async def wait_change(self, after: int) -> int:
        """Wait until a refresh later than ``after`` has been published; return its number."""
        while self.refreshes <= after:
            await self._changed.wait()
        return self.refreshes

    def history(self) -> dict[str, list[list[float | None]]]:
        """Per service, [time, calls/s, errors/s, p50, p95, p99 (ms)] per refresh, oldest first."""
        return {name: list(points) for name, points in self._history.items()}

    def _publish(self, overview: Overview | None) -> None:
        self.snapshot = self._encode(self._build(overview))
        self.refreshes += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _encode(self, value: Any) -> str:
        encoded = json.dumps(value, default=str, separators=(",", ":"))
        for secret in self._secrets:  # never on the page, whatever a message quoted
            encoded = encoded.replace(secret, "***")
        return encoded

    def scrub(self, value: Any) -> Any:
        """``value`` as JSON-ready data with every secret replaced."""
        return json.loads(self._encode(value))

    async def run(self) -> None:
        """Connect, refresh every ``interval``; on a Redis outage say so and connect again, forever."""
        while True:
            try:
                async with Client(self.url, namespace=self.namespace) as client:
                    self.client = client
                    self._reader = RegistryReader(client.keys)
                    while True:
                        started = time.monotonic()
                        with anyio.fail_after(READ_TIMEOUT):
                            overview = await self._reader.read(client.redis)
                            if time.monotonic() - self._jobs_at >= JOBS_EVERY:
                                self._jobs_at = time.monotonic()
                                await self._read_jobs(client, overview)
                        self._up()
                        self._publish(overview)
                        # A namespace so large that a refresh takes half the interval is read less often.
                        took = time.monotonic() - started
                        await anyio.sleep(max(took, self.interval - took))
            except Exception as exc:  # Redis away, or a reply we could not read: say so, try again
                self._down(exc)
                self._publish(None)
            finally:
                self.client = None
            await anyio.sleep(min(1.0, self.interval))

    def _up(self) -> None:
        if not self._redis["ok"]:
            self._reconnected = self._read_once
            self._redis = {"ok": True, "since": time.time(), "error": None}
            self._event("redis", "", "", "Redis reachable")

    def _down(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, TimeoutError):
            message = f"no answer from Redis within {READ_TIMEOUT:g} s"
        if self._redis["ok"] or self._redis["error"] == "connecting":
            self._redis = {"ok": False, "since": time.time(), "error": message}
            self._event("redis", "", "", f"Redis unreachable: {message}")
        else:
            self._redis["error"] = message
        logger.debug("dashboard: %s", message)

    def _event(self, kind: str, service: str, worker: str, detail: str) -> None:
        self._events.appendleft(
            {"at": time.time(), "kind": kind, "service": service, "worker": worker, "detail": detail}
        )

    # -- one refresh ---------------------------------------------------------------------------

    def _build(self, overview: Overview | None) -> dict[str, Any]:
        now = time.time()
        services: list[dict[str, Any]] = []
        workers: list[dict[str, Any]] = []
        if overview is not None:
            self._cost = {
                "commands": overview.commands,
                "round_trips": overview.round_trips,
                "ms": round(overview.seconds * 1000, 2),
            }
            current: dict[tuple[str, str], WorkerInfo] = {}
            for service in overview.services:
                rates = self._rates(service, now)
                services.append(_service_row(service, rates))
                for w in service.info.workers:
                    current[(w.service, w.worker_id)] = w
                    workers.append(_worker_row(w, now))
                self._service_events(service)
            self._track(current, now)
            for name in list(self._history):
                if name not in {s.info.name for s in overview.services}:
                    del self._history[name]
        for key, (row, gone_at) in list(self._gone.items()):
            if now - gone_at > GONE_KEEP:
                del self._gone[key]
            elif overview is not None:
                workers.append({**row, "gone": True, "gone_at": gone_at})
        return {
            "at": now,
            "namespace": self.namespace if self.client is None else self.client.namespace,
            "redis": {**self._redis, "url": self.shown_url},
            "cost": self._cost,
            "actions": self.actions,
            "interval": self.interval,
            "services": services,
            "workers": workers,
            "jobs": self._jobs,
            "events": list(self._events)[:100],
        }

    def _rates(self, service: ServiceOverview, now: float) -> dict[str, float | None]:
        """calls/s, errors/s and latency percentiles since the last refresh, from the workers' counters."""
        calls = errors = 0
        elapsed = 0.0
        hists: list[LatencyHistogram] = []
        for w in service.info.workers:
            before = self._seen.get((w.service, w.worker_id))
            if before is None or w.calls < before.info.calls:  # new (or restarted): its counts start here
                continue
            calls += w.calls - before.info.calls
            errors += max(0, w.errors - before.info.errors)
            elapsed = max(elapsed, now - before.at)
            delta = LatencyHistogram()
            previous = before.info.latency.counts
            for i, n in enumerate(w.latency.counts):
                delta.counts[i] = max(0, n - previous[i])
            hists.append(delta)
        window = elapsed or self.interval
        merged = LatencyHistogram.merged(hists)
        summary = merged.summary()
        point: list[float | None] = [
            round(now, 3), round(calls / window, 3), round(errors / window, 3),
            summary["p50"], summary["p95"], summary["p99"],
        ]  # fmt: skip
        history = self._history.setdefault(service.info.name, deque())
        history.append(point)
        while history and now - (history[0][0] or 0) > HISTORY:
            history.popleft()
        return {"calls_s": point[1], "errors_s": point[2], "p50": point[3], "p95": point[4], "p99": point[5]}

    def _track(self, current: dict[tuple[str, str], WorkerInfo], now: float) -> None:
        first, self._read_once = not self._read_once, True  # the workers found first are not news
        for key, w in current.items():
            before = self._seen.get(key)
            if before is None:
                self._gone.pop(key, None)
                if not first:
                    self._event("ready" if w.status == "ready" else "appeared", w.service, w.worker_id,
                                f"{w.status} on {w.host} (pid {w.pid}, version {w.version})")  # fmt: skip
            elif before.info.status != w.status:
                self._event(w.status, w.service, w.worker_id, f"{before.info.status} -> {w.status}")
            self._seen[key] = _Seen(w, now)
        for key in set(self._seen) - set(current):
            last = self._seen.pop(key).info
            stopping = last.status in ("draining", "stopping", "stopped")
            why = (
                "stopped" if stopping
                else "not in the registry since Redis came back (lost with Redis's data, or gone)"
                if self._reconnected
                else "its record expired (crashed, killed or cut off)"
            )  # fmt: skip
            self._event("stopped" if stopping else "gone", last.service, last.worker_id,
                        f"{why} on {last.host} (pid {last.pid})")  # fmt: skip
            self._gone[key] = (_worker_row(last, now), now)
        self._reconnected = False

    def _service_events(self, service: ServiceOverview) -> None:
        """Events: ``scaled`` when its count of live workers changed, ``health`` when its health did."""
        name = service.info.name
        count, was = len(service.info.workers), self._counts.get(name)
        self._counts[name] = count
        if was is not None and was != count:
            self._event("scaled", name, "", f"{was} -> {count} live workers")
        status = str(service.health.status) if service.info.workers else "no workers"
        before = self._health.get(name)
        self._health[name] = status
        if before is not None and before != status:
            kind = "unhealthy" if status == "unhealthy" else "health"
            self._event(kind, name, "", f"{before} -> {status}")

    # -- jobs and schedules --------------------------------------------------------------------

    async def _read_jobs(self, client: Client, overview: Overview) -> None:
        """The latest jobs of the services that have any (some services per read, in turn), schedules."""
        with_jobs = [s.info.name for s in overview.services if s.jobs]
        counts: dict[str, Any] = {
            name: row for name, row in self._jobs["services"].items() if name in set(with_jobs)
        }
        turn = self._jobs_turn % len(with_jobs) if with_jobs else 0
        chosen = (with_jobs[turn:] + with_jobs[:turn])[:JOB_SERVICES_PER_READ]
        self._jobs_turn = turn + len(chosen)
        latest: list[dict[str, Any]] = [j for j in self._jobs["latest"] if j["service"] not in chosen]
        failed: list[dict[str, Any]] = [j for j in self._jobs["failed"] if j["service"] not in chosen]
        total = {s.info.name: s.jobs for s in overview.services}
        for name in chosen:
            found = await list_jobs(client.redis, client.keys, name, count=JOBS_PER_SERVICE)
            by_state = {str(state): 0 for state in JobState}
            for job in found:
                by_state[str(job.state)] += 1
            counts[name] = {"total": total.get(name, 0), "read": len(found), "states": by_state}
            latest.extend(_job_row(name, j) for j in found[:15])
            failed.extend(_job_row(name, j) for j in found if j.state in (JobState.FAILED, JobState.DEAD))
        latest.sort(key=lambda j: j["submitted"] or "", reverse=True)
        failed.sort(key=lambda j: j["finished"] or "", reverse=True)
        self._jobs = {
            "services": counts,
            "latest": latest[:60],
            "failed": failed[:60],
            "schedules": await self._schedules(client, overview),
        }

    async def _schedules(self, client: Client, overview: Overview) -> list[dict[str, Any]]:
        periodic = [
            (s.info.name, m)
            for s in overview.services
            for m in s.info.methods
            if "periodic" in m.get("decorators", {})
        ]
        names = sorted({name for name, _ in periodic})
        if not names:
            return []
        async with client.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(client.keys.schedule(name))
            states = dict(zip(names, await pipe.execute(), strict=True))
        rows = []
        for name, method in periodic:
            state = {text(k): text(v) for k, v in states[name].items()}
            options = method["decorators"]["periodic"]
            every, m = options.get("every"), method["name"]
            rows.append({
                "service": name, "method": m,
                "schedule": f"every {every:g} s" if every is not None else f"cron {options.get('cron')}",
                "last": _ms(state.get(f"{m}:last")), "next": _ms(state.get(f"{m}:next")),
                "job": state.get(f"{m}:job"), "state": None, "worker": None, "error": None,
            })  # fmt: skip
        with_job = [r for r in rows if r["job"]]
        if with_job:
            async with client.redis.pipeline(transaction=False) as pipe:
                for row in with_job:
                    service, _, token = str(row["job"]).partition(":")
                    pipe.hgetall(client.keys.job(service, token))
                hashes = await pipe.execute()
            for row, fields in zip(with_job, hashes, strict=True):
                if not fields:
                    row["state"] = "expired"
                    continue
                status = status_of(row["job"], fields)
                row["state"], row["worker"] = str(status.state), status.worker
                row["error"] = f"{status.error.type}: {status.error.message}" if status.error else None
        return rows


def _ms(raw: str | None) -> float | None:
    return int(raw) / 1000 if raw and raw.isdigit() else None


def _job_row(service: str, job: JobStatus) -> dict[str, Any]:
    return {"service": service, **job.to_dict()}


def _service_row(service: ServiceOverview, rates: dict[str, float | None]) -> dict[str, Any]:
    info = service.info
    return {
        "name": info.name,
        "description": info.description,
        "versions": [
            {"version": v.version, "methods": v.methods, "workers": len(v.workers)} for v in info.versions
        ],
        "hosts": info.hosts,
        "workers": len(info.workers),
        "in_flight": sum(w.in_flight for w in info.workers),
        "concurrency": sum(w.concurrency for w in info.workers),
        "health": _health(service),
        "queue": service.queue.to_dict(),
        "shards": info.shards,
        "delayed": service.delayed,
        "jobs": service.jobs,
        "breaker": None,  # a circuit breaker lives in each caller's process: the registry does not know it
        **rates,
    }


def _health(service: ServiceOverview) -> dict[str, Any]:
    """The service's health and each worker's checks (host and pid are in the worker rows)."""
    health = service.health
    if not service.info.workers:
        return {"status": "unhealthy", "healthy": 0, "workers": [], "note": "no live worker"}
    rows = [
        {"worker_id": w["worker_id"], "host": w["host"], "status": str(w["status"]), "checks": w["checks"],
         **({"details": w["details"]} if w["details"] else {})}
        for w in health.workers
    ]  # fmt: skip
    return {"status": str(health.status), "healthy": health.healthy, "failed": health.failed, "workers": rows}


def _worker_row(w: WorkerInfo, now: float) -> dict[str, Any]:
    return {
        "id": w.worker_id,
        "service": w.service,
        "host": w.host,
        "pid": w.pid,
        "version": w.version,
        "status": w.status,
        "health": (w.health or {}).get("status", "healthy"),
        "in_flight": w.in_flight,
        "concurrency": w.concurrency,
        "calls": w.calls,
        "errors": w.errors,
        "cpu": w.cpu_percent,
        "rss": w.rss,
        "started_at": w.started_at,
        "heartbeat_at": w.heartbeat_at,
        "age": round(max(0.0, now - w.heartbeat_at), 2),
        "gone": False,
    }
