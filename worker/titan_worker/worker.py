"""The worker: composes its parts and runs their lifecycle.

A worker is a task group. ``run`` connects, calls ``init(**dependencies)``,
registers, reports readiness and serves until ``stop()``; then it drains
(calls in flight finish within the grace period), runs the @on_shutdown
methods and deregisters. Each part has a module of its own:

- ``intake``: reading calls into slots (and the drain);
- ``execution``: an entry to an outcome, through the method's ``middleware`` chain;
- ``settlement``: the answer and the acknowledgement, or the dead letter;
- ``housekeeping``: what dead workers left behind;
- ``liveness``: registration and the heartbeat, on a thread of its own.

The constructor does no I/O, so a worker can also run in-process:
``async with anyio.create_task_group() as tg: await tg.start(worker.run)``.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc

from titan_broker._config import WorkerOptions, check_name, redact
from titan_broker._errors import ConfigError, TitanError
from titan_broker._redis import (
    SOCKET_TIMEOUT,
    Acting,
    AutoPipeline,
    Channel,
    Topology,
    acting,
    discover,
    open_redis,
    text,
)
from titan_broker._registry import (
    LatencyHistogram,
    WorkerInfo,
    queued,
    read_workers,
    registered_users,
    shard_count,
)
from titan_broker._service import Health, ServiceDefinition
from titan_broker._wire import Keys, protocol, shard_scopes

from .call import Entry, Reply
from .context import WorkerContext
from .execution import Executor
from .housekeeping import Housekeeping
from .intake import Intake, Lane
from .liveness import Heartbeat, mismatch
from .metrics import Metrics
from .scheduling import Scheduler
from .settlement import Settlement, Settling

logger = logging.getLogger(__name__)

_WORKER_ID = re.compile(r"[^@{}:\s]{1,128}")
"""Worker ids: part of key names (``calls:<id>``, ``worker:<id>``), so no '@' (a user stream's mark),
no braces (a hash tag), no colon and no space."""


class InitError(TitanError):
    """The service's ``init()`` raised."""


def _unhealthy(error: str) -> dict[str, Any]:
    return {"status": "unhealthy", "checks": {}, "details": {"error": error}}


class Worker:
    """Serves one service definition; ``await worker.run()`` until ``stop()``."""

    def __init__(
        self,
        definition: ServiceDefinition,
        *,
        url: str,
        namespace: str,
        options: WorkerOptions | None = None,
        dependencies: Mapping[str, Any] | None = None,
        service_name: str | None = None,
        worker_id: str | None = None,
    ) -> None:
        options = options or WorkerOptions()
        service = check_name(service_name or definition.name, "service name")
        if worker_id is not None and not _WORKER_ID.fullmatch(worker_id):
            # A part of key names: '@' would read as a registered caller user's stream (calls:<id>@<user>).
            raise ConfigError(
                f"worker id {worker_id!r} is not valid: use 1-128 characters, none of @ {{ }} : or a space"
            )
        self.url = url
        self.dependencies = dict(dependencies or {})
        self.ctx = WorkerContext(
            definition=definition,
            options=options,
            keys=Keys(namespace),
            service=service,
            worker_id=worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            metrics=Metrics(service),
            shards=options.shards or definition.info.shards,
        )
        self.instance: Any = None
        self.status = "starting"
        self.calls = 0
        self.errors = 0
        self.latency = LatencyHistogram()
        self._usage_mark = (time.monotonic(), _cpu_seconds())
        self.metrics_port: int | None = None
        self.unhealthy_streak = 0
        """Consecutive health checks that failed; a pool replaces a worker past its threshold."""
        self.housekeeping = Housekeeping(self.ctx)
        self.settlement = Settlement(self.ctx)
        self.intake = Intake(self.ctx, self.housekeeping, self._serve)
        self.heartbeat = Heartbeat(self.ctx, self.intake.active_ids)
        self.scheduler = Scheduler(self.ctx)
        self._executor: Executor | None = None
        self._health: dict[str, Any] | None = None
        self._stopping = False
        self._host = socket.gethostname()
        self._started_at = time.time()
        self._methods = [m.describe() for m in definition.methods.values()]
        self._odd_limit = (self.ctx.options.max_deliveries or 1) < 1
        """A max_deliveries option below 1 (not refused when given): every delivery is checked."""

    @property
    def definition(self) -> ServiceDefinition:
        return self.ctx.definition

    @property
    def options(self) -> WorkerOptions:
        return self.ctx.options

    @property
    def service(self) -> str:
        return self.ctx.service

    @property
    def worker_id(self) -> str:
        return self.ctx.worker_id

    @property
    def in_flight(self) -> int:
        return self.intake.in_flight

    @property
    def stopping(self) -> bool:
        """True once stop() was called."""
        return self._stopping

    def stop(self) -> None:
        """Stop reading new calls and begin the drain (safe to call more than once)."""
        if not self._stopping:
            logger.info("worker %s: stopping, draining %d call(s)", self.worker_id, self.in_flight)
        self._stopping = True
        self.status = "draining"
        self.intake.stop()
        self.scheduler.stop_ticking()

    def forget_local_state(self) -> None:
        """Build every method's middleware chain afresh: what this worker keeps for itself
        (worker-scope rate-limit buckets and cached results) starts over. Calls in flight finish on
        the chains they began with; the state kept in Redis is not touched."""
        if self._executor is not None:
            self._executor = Executor(self.ctx, self.instance)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); raises RedisUnavailable or InitError when start-up fails."""
        ctx = self.ctx
        acting.set(Acting("worker"))
        topology = await discover(self.url)
        # The slots, the housekeeping, and a wait on each shard's list of delayed calls due soon.
        ctx.redis_ = await open_redis(topology, max_connections=ctx.options.concurrency + 4 + ctx.shards)
        channels: list[Channel] = []
        http: Any = None
        try:
            await self._check_shards()
            lanes = await self._open_lanes(topology, channels)
            self.instance = self.definition.cls()
            if self.definition.has_init:
                try:
                    await self.instance.init(**self.dependencies)
                except Exception as exc:
                    raise InitError(
                        f"{self.definition.cls.__qualname__}.init() raised {type(exc).__name__}: {exc}"
                    ) from exc
            self._executor = Executor(ctx, self.instance)
            await self.intake.ensure_groups()
            if ctx.options.metrics_port is not None:
                import prometheus_client  # only for a worker that serves its metrics

                http, _thread = prometheus_client.start_http_server(
                    ctx.options.metrics_port, registry=ctx.metrics.registry
                )
                self.metrics_port = int(http.server_port)
            self.status = "ready"
            self._health = await self._check_health()
            self._publish()
            await self.heartbeat.start(topology)
            logger.info(
                "worker %s serving %r (v%s) on %s, concurrency %d",
                self.worker_id, self.service, self.definition.version, redact(self.url),
                ctx.options.concurrency,
            )  # fmt: skip
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._publish_loop)
                tg.start_soon(self.scheduler.run)
                await self.intake.run(lanes, ctx.options.grace_period)
                tg.cancel_scope.cancel()
            await self._run_shutdown_hooks()
            await anyio.to_thread.run_sync(self.heartbeat.stop)
            await anyio.to_thread.run_sync(self.heartbeat.deregister)
            logger.info("worker %s stopped after %d call(s)", self.worker_id, self.calls)
        finally:
            with anyio.CancelScope(shield=True):
                self.heartbeat.stop()
                self.heartbeat.close()
                if http is not None:
                    http.shutdown()
                for pipe in (ctx.writer_, *ctx.writers_.values()):
                    if pipe is not None:
                        await pipe.aclose()
                for channel in channels:
                    await channel.aclose()
                ctx.writer_ = None
                ctx.writers_.clear()
                await ctx.redis.aclose()
                ctx.redis_ = None

    async def _open_lanes(self, topology: Topology, channels: list[Channel]) -> list[Lane]:
        """A reader and a writer per shard, on the node of its slot (one writer for all on a single
        Redis); the first shard's reader also reads this worker's own stream."""
        ctx = self.ctx
        lanes = []
        for scope, stream in zip(ctx.scopes, ctx.streams, strict=True):
            # A blocked read waits up to read_block for calls: its socket may wait that much longer.
            timeout = SOCKET_TIMEOUT + ctx.options.read_block
            reader = await Channel.open(topology, stream, socket_timeout=timeout)
            channels.append(reader)
            if stream == ctx.stream:
                lanes.append(Lane(reader, [stream, ctx.own_stream]))
                writer = await Channel.open(topology, stream)
                channels.append(writer)
                ctx.writer_ = AutoPipeline(writer)
                continue
            lanes.append(Lane(reader, [stream, ctx.own_stream_of(scope)]))
            if topology.kind == "cluster":  # a script's keys must be in one slot: settles batched per shard
                writer = await Channel.open(topology, stream)
                channels.append(writer)
                ctx.writers_[scope] = AutoPipeline(writer)
        return lanes

    async def _check_shards(self) -> None:
        """Refuse early (before ``init()``) a shard count other than the one live workers of the service
        registered (``register.lua`` checks it again, in one step with the registration), and fewer
        shards than before while the shards dropped still hold calls, which nobody would read."""
        ctx = self.ctx
        registered = await shard_count(ctx.redis, ctx.keys, ctx.service)
        if registered == ctx.shards:
            return
        ids = {text(w) for w in await ctx.redis.smembers(ctx.keys.workers(ctx.service))} - {ctx.worker_id}
        live = [w.worker_id for w in await read_workers(ctx.redis, ctx.keys, ctx.service, sorted(ids))]
        if live:
            raise ConfigError(mismatch(ctx.service, registered, live, ctx.shards))
        dropped = shard_scopes(ctx.service, registered)[ctx.shards :]
        left = await queued(
            ctx.redis, ctx.keys, dropped, await registered_users(ctx.redis, ctx.keys, ctx.service)
        )
        if left:
            which = f"shard {ctx.shards}" if len(dropped) == 1 else f"shards {ctx.shards} to {registered - 1}"
            raise ConfigError(
                f"service {ctx.service!r} had shards={registered}: its {which} still hold {left} "
                f"call(s), which a worker with shards={ctx.shards} would never read; run its workers "
                f"with shards={registered} until titan queues shows them empty (or titan purge them), "
                f"then start them with shards={ctx.shards}"
            )

    async def _serve(self, entry: Entry, deliveries: int) -> Settling | None:
        """Run one entry and settle it; every failure ends as an answer, a dead letter or a log line.
        A reply's settle is returned on its way (the intake frees the slot once it is done)."""
        assert self._executor is not None
        # A first delivery never moved is under any limit (each is at least 1): no need to look.
        if deliveries > 1 or protocol.F_MOVES in entry.fields or self._odd_limit:
            poisoned = self.intake.poisoned(entry, deliveries)
            if poisoned is not None:
                await self.settlement.settle(entry, poisoned)
                return None
        if deliveries > 1 and await self.scheduler.overtaken(entry):
            return None  # a periodic run a later tick overtook while nobody ran it: not piled on
        started = time.perf_counter()
        outcome = await self._executor.execute(entry)
        self.latency.observe(time.perf_counter() - started)
        self.calls += 1
        if not outcome.ok:
            self.errors += 1
        if type(outcome) is Reply:
            return self.settlement.answer_soon(entry, outcome)
        await self.settlement.settle(entry, outcome)
        return None

    def _publish(self) -> None:
        """Hand the heartbeat a fresh record (it writes it from its thread, with its own time)."""
        self.heartbeat.record = WorkerInfo(
            worker_id=self.worker_id,
            service=self.service,
            version=self.definition.version,
            host=self._host,
            pid=os.getpid(),
            status=self.status,
            in_flight=self.in_flight,
            concurrency=self.options.concurrency,
            calls=self.calls,
            errors=self.errors,
            started_at=self._started_at,
            heartbeat_at=time.time(),
            health=self._health,
            unhealthy_streak=self.unhealthy_streak,
            latency_counts=self.latency.to_dict(),
            methods=self._methods,
            metrics_port=self.metrics_port,
            metrics=self.ctx.metrics.summary(),
            **self._usage(),
        )
        self.heartbeat.tick = time.monotonic()

    def _usage(self) -> dict[str, Any]:
        """CPU since the last heartbeat (percent of one core) and resident memory, for the registry."""
        now, cpu = time.monotonic(), _cpu_seconds()
        then, cpu_then = self._usage_mark
        self._usage_mark = (now, cpu)
        usage: dict[str, Any] = {"cpu_percent": round(100 * (cpu - cpu_then) / max(now - then, 1e-6), 1)}
        rss = _rss()
        if rss is not None:
            usage["rss"] = rss
        return usage

    async def _publish_loop(self) -> None:
        """On the loop: run health checks, watch the manager, publish numbers to the heartbeat."""
        options = self.options
        next_health = time.monotonic() + options.health_interval
        while True:
            await anyio.sleep(options.heartbeat_interval)
            parent = options.parent_pid
            if parent is not None and os.getppid() != parent and not self._stopping:
                logger.warning("worker %s: its manager (pid %d) is gone; stopping", self.worker_id, parent)
                self.stop()
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + options.health_interval
                self._health = await self._check_health()
            self._publish()

    async def _check_health(self) -> dict[str, Any] | None:
        """Run the @health_check with a timeout; raising or timing out counts as unhealthy."""
        name = self.definition.health_check
        if name is None:
            return None
        timeout = self.options.health_timeout
        result: Any = None
        try:
            check = getattr(self.instance, name)
            with anyio.fail_after(timeout):
                if inspect.iscoroutinefunction(check):
                    result = await check()
                else:  # a plain def may block (a database ping): keep it off the event loop
                    result = await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
            report = (
                result.to_dict()
                if isinstance(result, Health)
                else _unhealthy(f"{name}() returned {protocol.safe_repr(result)}, not Health")
            )
        except TimeoutError:
            report = _unhealthy(f"{name}() took longer than {timeout:g} s")
        except Exception as exc:
            report = _unhealthy(f"{name}() raised {type(exc).__name__}: {exc}")
        self.unhealthy_streak = self.unhealthy_streak + 1 if report["status"] == "unhealthy" else 0
        report["at"] = round(time.time(), 3)
        return report

    async def _run_shutdown_hooks(self) -> None:
        for name in self.definition.on_shutdown:
            try:
                with anyio.fail_after(self.options.grace_period or 1.0):
                    await getattr(self.instance, name)()
            except Exception:
                logger.exception("worker %s: @on_shutdown %s() failed", self.worker_id, name)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _rss() -> int | None:
    """This process's resident memory in bytes: from /proc where there is one (psutil, a heavier
    import, elsewhere); None when neither can tell."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None
