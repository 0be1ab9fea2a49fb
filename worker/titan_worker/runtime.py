"""The worker runtime: serve one service's request stream through the consumer group.

A worker is a task group: a heartbeat task, a read loop and one task per
call in flight. It reads no more entries than it has free slots, so it never
holds work that an idle sibling could do. An entry is acknowledged and
deleted only by the script that writes its reply, after the reply.

Liveness is the heartbeat: every beat refreshes the worker's record and
renews its in-flight entries (XCLAIM JUSTID: idle time reset, no delivery
counted). An entry idle longer than the heartbeat TTL therefore belongs to a
dead worker, and any live worker claims it (XAUTOCLAIM, walking the pending
list with its cursor). An entry delivered more than max_deliveries times
goes to the dead letters and its caller is told.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import anyio
import anyio.lowlevel
import prometheus_client
from anyio.streams.memory import MemoryObjectSendStream
from opentelemetry import trace as otel
from redis import exceptions as rexc
from redis.typing import EncodableT, FieldT

from titan_broker import protocol
from titan_broker.arguments import check_arguments
from titan_broker.config import WorkerOptions, check_name, redact
from titan_broker.connection import (
    CONNECTION_ERRORS,
    AutoPipeline,
    Channel,
    Redis,
    open_redis,
    stream_entries,
)
from titan_broker.decorators import CacheOptions, Health, RateLimitOptions
from titan_broker.definition import MethodSpec, ServiceDefinition
from titan_broker.errors import EncodeError, RedisUnavailable, TitanError
from titan_broker.keys import GROUP, Keys
from titan_broker.stats import LatencyHistogram

from .features import LocalBucket, LocalCache, Metrics, cache_key, traced
from .scripts import SOURCES, ScriptShas

logger = logging.getLogger(__name__)


# Errors after which a step is tried again once Redis is back.
_TRANSIENT: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, RedisUnavailable)
_REDIS_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, rexc.ResponseError)


_Work = tuple[str, bytes, dict[bytes, bytes]]
"""A call for a slot: (stream, entry id, fields)."""


def _moves(fields: dict[bytes, bytes]) -> int:
    """How often an entry was moved off a dead worker's own stream (field x; junk counts as 0)."""
    raw = fields.get(b"x", b"0")
    return int(raw) if raw.isdigit() and len(raw) < 6 else 0


def _unhealthy(error: str) -> dict[str, Any]:
    return {"status": "unhealthy", "checks": {}, "details": {"error": error}}


class InitError(TitanError):
    """The service's ``init()`` raised."""


@dataclass(frozen=True)
class _Outcome:
    reply_to: str | None
    payload: bytes | None
    ok: bool
    deadline_ms: int | None = None
    dead_reason: str | None = None
    """Set when the entry cannot be answered: it goes to the dead letters."""
    value: Any = None
    """The result, when ok (for @cache)."""


class Worker:
    """Serves one service definition; ``await worker.run()`` until ``stop()``.

    The constructor does no I/O. ``run`` connects, calls ``init(**dependencies)``,
    registers, reports readiness through ``task_status`` and serves until
    ``stop()``; then it drains (finishes calls in flight within the grace
    period), runs the @on_shutdown methods and deregisters.
    """

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
        self.definition = definition
        self.url = url
        self.keys = Keys(namespace)
        self.options = options or WorkerOptions()
        self.dependencies = dict(dependencies or {})
        self.service = check_name(service_name or definition.name, "service name")
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stream = self.keys.calls(self.service)
        self.own_stream = self.keys.worker_calls(self.service, self.worker_id)
        """Calls whose affinity key maps to this worker."""
        self.record_key = self.keys.worker(self.service, self.worker_id)
        self.instance: Any = None
        self.status = "starting"
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.latency = LatencyHistogram()
        self.metrics = Metrics(self.service)
        self.metrics_port: int | None = None
        self._caches: dict[str, LocalCache] = {}
        self._buckets: dict[tuple[str, str], LocalBucket] = {}
        # method -> the cached methods whose results it invalidates
        self._invalidates: dict[str, list[str]] = {}
        for spec in definition.methods.values():
            for name in spec.cache.invalidated_by if spec.cache else ():
                self._invalidates.setdefault(name, []).append(spec.name)
        self.started_at = time.time()
        self.unhealthy_streak = 0
        """Consecutive health checks that failed; a pool replaces a worker past its threshold."""
        self._stopping = False
        self._reading = False
        self._slot_freed: anyio.Event | None = None
        self._stop_requested: anyio.Event | None = None
        self._redis: Redis | None = None
        self._reader: Channel | None = None
        self._reader_id: int | None = None
        self._shas = ScriptShas()
        self._writer: AutoPipeline | None = None
        self._active: set[tuple[str, bytes]] = set()
        """(stream, entry id) of every call in flight."""
        self._slots: MemoryObjectSendStream[_Work] | None = None
        self._claim_cursor = "0-0"
        self._reclaims = 0
        self._health: dict[str, Any] | None = None

    @property
    def redis(self) -> Redis:
        assert self._redis is not None, "worker is not running"
        return self._redis

    @property
    def stopping(self) -> bool:
        """True once stop() was called."""
        return self._stopping

    def stop(self) -> None:
        """Stop reading new calls and begin the drain (safe to call more than once)."""
        if not self._stopping:
            logger.info("worker %s: stopping, draining %d call(s)", self.worker_id, self.in_flight)
        self._stopping = True
        for event in (self._slot_freed, self._stop_requested):
            if event is not None:
                event.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); raises RedisUnavailable or InitError when start-up fails."""
        self._slot_freed = anyio.Event()
        self._stop_requested = anyio.Event()
        # The read loop has a connection of its own, so that stop() can end a blocked
        # XREADGROUP with CLIENT UNBLOCK; replies go out on another, batched.
        self._redis = await open_redis(self.url, max_connections=self.options.concurrency + 4)
        writer: Channel | None = None
        http: Any = None
        try:
            self._reader = await Channel.open(self.url)
            self._reader_id = await self._reader.execute("CLIENT", "ID")
            writer = await Channel.open(self.url)
            self._writer = AutoPipeline(writer)
            self.instance = self.definition.cls()
            if self.definition.has_init:
                try:
                    await self.instance.init(**self.dependencies)
                except Exception as exc:
                    raise InitError(
                        f"{self.definition.cls.__qualname__}.init() raised {type(exc).__name__}: {exc}"
                    ) from exc
            await self._ensure_group()
            await self._load_scripts()
            if self.options.metrics_port is not None:
                http, _thread = prometheus_client.start_http_server(
                    self.options.metrics_port, registry=self.metrics.registry
                )
                self.metrics_port = int(http.server_port)
            self.status = "ready"
            await self._register()
            logger.info(
                "worker %s serving %r (v%s) on %s, concurrency %d",
                self.worker_id, self.service, self.definition.version, redact(self.url),
                self.options.concurrency,
            )  # fmt: skip
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._unblock_reader_on_stop)
                await self._serve()
                tg.cancel_scope.cancel()
            await self._run_shutdown_hooks()
            await self._deregister()
        finally:
            if http is not None:
                http.shutdown()
            if writer is not None:
                await writer.aclose()
            self._writer = None
            if self._reader is not None:
                await self._reader.aclose()
                self._reader = None
            await self._redis.aclose()
            self._redis = None

    async def _unblock_reader_on_stop(self) -> None:
        assert self._stop_requested is not None
        await self._stop_requested.wait()
        # Repeat: the reader may be between two reads when the first unblock lands.
        while self._reading:
            if self._reader_id is not None:
                with contextlib.suppress(*CONNECTION_ERRORS, rexc.ResponseError):
                    await self.redis.client_unblock(self._reader_id)
            await anyio.sleep(0.05)

    async def _serve(self) -> None:
        # One long-lived task per slot, fed entries through a memory stream: much
        # cheaper on the hot path than starting a task per call.
        send, receive = anyio.create_memory_object_stream[_Work](self.options.concurrency)
        self._slots = send
        async with anyio.create_task_group() as calls, send, receive:
            for _ in range(self.options.concurrency):
                calls.start_soon(self._slot, receive)
            await self._read_loop(calls)
            self.status = "draining"
            with anyio.move_on_after(self.options.grace_period):
                while self.in_flight:
                    await self._wait_slot_change()
            if self.in_flight:
                # Unacknowledged entries stay pending and are claimed by another worker.
                logger.warning(
                    "worker %s: grace period of %.1f s over, abandoning %d call(s) to other workers",
                    self.worker_id, self.options.grace_period, self.in_flight,
                )  # fmt: skip
            calls.cancel_scope.cancel()

    async def _wait_slot_change(self) -> None:
        assert self._slot_freed is not None
        await self._slot_freed.wait()
        self._slot_freed = anyio.Event()

    async def _read_loop(self, calls: anyio.abc.TaskGroup) -> None:
        assert self._reader is not None
        block_ms = max(1, int(self.options.read_block * 1000))
        self._reading = True
        try:
            await self._read_until_stopped(calls, self._reader, block_ms)
        finally:
            self._reading = False

    async def _read_until_stopped(self, calls: anyio.abc.TaskGroup, reader: Channel, block_ms: int) -> None:
        backoff = 0.05
        next_reclaim = 0.0
        while not self._stopping:
            free = self.options.concurrency - self.in_flight
            if free <= 0:
                await self._wait_slot_change()
                continue
            try:
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + self.options.heartbeat_interval
                    if await self._reclaim(calls, reader, free):
                        continue  # slots changed; recount before reading
                response = await reader.execute(
                    "XREADGROUP", "GROUP", GROUP, self.worker_id, "COUNT", free, "BLOCK", block_ms,
                    "STREAMS", self.stream, self.own_stream, ">", ">",
                )  # fmt: skip
                backoff = 0.05
            except rexc.NoScriptError:
                await self._load_scripts()  # Redis restarted without its script cache
                continue
            except rexc.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()  # Redis lost the group: make it again
                continue
            except CONNECTION_ERRORS as exc:
                logger.warning("worker %s lost Redis (%s); retrying in %.2f s", self.worker_id, exc, backoff)
                self._reader_id = None
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                with contextlib.suppress(*CONNECTION_ERRORS):
                    self._reader_id = await reader.execute("CLIENT", "ID")
                continue
            for stream, entry_id, fields in stream_entries(response):
                self._start(calls, stream.decode(), entry_id, fields)
            # Let the new calls run (and a quick one reply) before the next read is sent.
            await anyio.lowlevel.checkpoint()

    def _start(
        self, calls: anyio.abc.TaskGroup, stream: str, entry_id: bytes, fields: dict[bytes, bytes]
    ) -> None:
        assert self._slots is not None
        self.in_flight += 1
        self._active.add((stream, entry_id))
        moves = _moves(fields)
        limit = self._limit(fields)
        if moves >= limit:
            # Moved off the personal streams of workers that died holding it, time and again.
            calls.start_soon(self._bury, stream, entry_id, fields, moves + 1, limit)
            return
        self._slots.send_nowait((stream, entry_id, fields))  # never full: in_flight <= concurrency

    def _limit(self, fields: dict[bytes, bytes]) -> int:
        method = protocol.field_text(fields, protocol.F_METHOD)
        return self.options.max_deliveries or self.definition.max_deliveries(method)

    async def _slot(self, receive: anyio.abc.ObjectReceiveStream[_Work]) -> None:
        async for stream, entry_id, fields in receive:
            try:
                await self._handle(stream, entry_id, fields)
            except Exception:
                # Never lose a slot. The entry stays pending, unrenewed: it is claimed
                # again and, if this keeps happening, dead-lettered.
                logger.exception("worker %s: failed to settle %s", self.worker_id, entry_id.decode())

    async def _reclaim(self, calls: anyio.abc.TaskGroup, reader: Channel, free: int) -> int:
        """Claim calls left pending by dead workers; return how many were taken."""
        min_idle = int(self.options.heartbeat_ttl * 1000)
        cursor, entries, counts = await self._evalsha(
            reader, "reclaim", [self.stream], [GROUP, self.worker_id, min_idle, self._claim_cursor, free]
        )
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        self._reclaims += 1
        if self._reclaims % 5 == 0:
            calls.start_soon(self._remove_dead_consumers)
            calls.start_soon(self._rescue_dead_streams)
        for (entry_id, raw_fields), deliveries in zip(entries, counts, strict=True):
            fields = dict(zip(raw_fields[::2], raw_fields[1::2], strict=True))
            limit = self._limit(fields)
            logger.warning(
                "worker %s claimed call %s (%s) from a dead worker, delivery %d of %d",
                self.worker_id, entry_id.decode(), fields.get(protocol.F_METHOD), deliveries, limit,
            )  # fmt: skip
            if deliveries > limit:
                self.in_flight += 1
                self._active.add((self.stream, entry_id))
                calls.start_soon(self._bury, self.stream, entry_id, fields, deliveries, limit)
            else:
                self._start(calls, self.stream, entry_id, fields)
        return len(entries)

    async def _handle(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            started = time.perf_counter()
            outcome = await self._execute(entry_id, fields)
            self.latency.observe(time.perf_counter() - started)
            self.calls += 1
            if not outcome.ok:
                self.errors += 1
            if outcome.dead_reason is not None:
                await self._settle(entry_id, outcome.deadline_ms, self._dead_letter, stream, entry_id, fields,
                                   outcome.dead_reason, 1)  # fmt: skip
            else:
                try:
                    await self._settle(entry_id, outcome.deadline_ms, self._finish, stream, entry_id, outcome)
                except rexc.ResponseError as exc:
                    # The reply key cannot take a reply (a key of another type, say): keep the call.
                    reason = f"its reply could not be written: {exc}"
                    await self._settle(
                        entry_id, None, self._dead_letter, stream, entry_id, fields, reason, 1, False
                    )
        finally:
            self._done(stream, entry_id)

    async def _bury(
        self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int, limit: int
    ) -> None:
        """Dead-letter a call its workers kept dying on, and tell its caller."""
        method = protocol.field_text(fields, protocol.F_METHOD) or "?"
        reason = (
            f"{method}() was delivered {deliveries} times (max_deliveries {limit}): the workers "
            f"running it died each time; it was moved to the dead letters of {self.service!r}"
        )
        try:
            await self._settle(
                entry_id, None, self._dead_letter, stream, entry_id, fields, reason, deliveries
            )
        except Exception:
            # Left pending: claimed and tried again later.
            logger.exception("worker %s: failed to dead-letter %s", self.worker_id, entry_id.decode())
        finally:
            self._done(stream, entry_id)

    def _done(self, stream: str, entry_id: bytes) -> None:
        self._active.discard((stream, entry_id))
        self.in_flight -= 1
        assert self._slot_freed is not None
        self._slot_freed.set()

    async def _settle(self, entry_id: bytes, deadline_ms: int | None, step: Any, *args: Any) -> None:
        """Run the script that answers and acknowledges an entry, riding out a Redis outage.

        Retries until Redis is back, for at most 30 s past the call's deadline;
        then the entry is left pending (and no longer renewed) for another
        worker to claim.
        """
        deadline = (deadline_ms / 1000 if deadline_ms else time.time()) + 30.0
        backoff = 0.05
        while True:
            try:
                await step(*args)
                return
            except _TRANSIENT as exc:
                if time.time() > deadline:
                    logger.error("worker %s: could not answer %s (%s); leaving it pending",
                                 self.worker_id, entry_id.decode(), exc)  # fmt: skip
                    return
                logger.warning("worker %s: cannot answer %s yet (%s); retrying in %.2f s",
                               self.worker_id, entry_id.decode(), exc, backoff)  # fmt: skip
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _finish(self, stream: str, entry_id: bytes, outcome: _Outcome) -> None:
        assert self._writer is not None
        keys = [stream]
        if outcome.reply_to is not None and outcome.payload is not None:
            keys.append(outcome.reply_to)
        args = [entry_id, GROUP, outcome.payload or b"", int(self.options.reply_ttl * 1000)]
        await self._evalsha(self._writer, "finish", keys, args)

    async def _dead_letter(
        self,
        stream: str,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        reason: str,
        deliveries: int,
        answer: bool = True,
    ) -> None:
        call_id = protocol.field_text(fields, protocol.F_ID)
        reply_to = protocol.field_text(fields, protocol.F_REPLY)
        keys = [stream, self.keys.dead(self.service)]
        payload = b""
        if answer and call_id and reply_to and reply_to.startswith(self.keys.reply_prefix):
            keys.append(reply_to)
            payload = protocol.encode_error(call_id, "titan.DeadLettered", reason, self.worker_id)
        dead = protocol.dead_letter_fields(
            fields, reason=reason, deliveries=deliveries, worker=self.worker_id, source_id=entry_id
        )
        args: list[Any] = [entry_id, GROUP, self.options.dead_letter_maxlen, payload,
                           int(self.options.reply_ttl * 1000)]  # fmt: skip
        for name, value in dead.items():
            args += (name, value)
        logger.error("worker %s: dead-lettered %s: %s", self.worker_id, entry_id.decode(), reason)
        try:
            await self._evalsha(self.redis, "dead_letter", keys, args)
        except rexc.ResponseError:
            if len(keys) == 2 or not answer:
                raise
            # The caller's reply key cannot take the reply: keep the dead letter anyway.
            await self._dead_letter(stream, entry_id, fields, reason, deliveries, answer=False)

    async def _load_scripts(self) -> None:
        for name, source in SOURCES.items():
            setattr(self._shas, name, await self.redis.script_load(source))

    async def _evalsha(
        self, via: Redis | Channel | AutoPipeline, name: str, keys: list[Any], args: list[Any]
    ) -> Any:
        """Run a loaded script (reloading them all if Redis lost its script cache)."""
        for attempt in (1, 2):
            command = ("EVALSHA", getattr(self._shas, name), len(keys), *keys, *args)
            try:
                if isinstance(via, Redis):
                    return await via.execute_command(*command)  # type: ignore[no-untyped-call]
                return await via.execute(*command)
            except rexc.NoScriptError:
                if attempt == 2:
                    raise
                await self._load_scripts()
        raise AssertionError("unreachable")

    async def _rescue_dead_streams(self) -> None:
        """Move calls waiting on the own streams of dead workers to the shared stream."""
        try:
            for raw in await self.redis.smembers(self.keys.affinity(self.service)):
                wid = raw.decode() if isinstance(raw, bytes) else str(raw)
                if wid != self.worker_id:
                    await self._rescue(wid)
        except Exception as exc:  # housekeeping must never take the worker down
            logger.warning("worker %s: could not rescue dead workers' calls (%s)", self.worker_id, exc)

    async def _rescue(self, wid: str) -> None:
        keys = [
            self.keys.worker_calls(self.service, wid),
            self.stream,
            self.keys.worker(self.service, wid),
            self.keys.affinity(self.service),
        ]
        moved = await self._evalsha(self.redis, "rescue", keys, [wid])
        if moved and moved > 0:
            logger.warning("worker %s moved %d call(s) of the dead worker %s to the shared stream",
                           self.worker_id, moved, wid)  # fmt: skip

    async def _remove_dead_consumers(self) -> None:
        """Delete consumers whose worker is gone once nothing is pending on them."""
        try:
            consumers = await self.redis.xinfo_consumers(self.stream, GROUP)
            for consumer in consumers:
                name = consumer["name"]
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name == self.worker_id or int(consumer.get("pending", 0)):
                    continue
                keys = [self.stream, self.keys.worker(self.service, name)]
                if await self._evalsha(self.redis, "delete_consumer", keys, [GROUP, name]) == 1:
                    logger.info("worker %s removed the dead consumer %s", self.worker_id, name)
        except Exception as exc:  # housekeeping must never take the worker down
            logger.warning("worker %s: could not clean up dead consumers (%s)", self.worker_id, exc)

    async def _execute(self, entry_id: bytes, fields: dict[bytes, bytes]) -> _Outcome:
        wid = self.worker_id
        try:
            req = protocol.decode_request(
                fields, entry_id, reply_prefix=self.keys.reply_prefix, max_payload=self.options.max_payload
            )
        except protocol.BadEntry as bad:
            logger.warning("worker %s: bad request entry: %s", wid, bad)
            if bad.call_id and bad.reply_to:
                payload = protocol.encode_error(bad.call_id, bad.type, str(bad), wid)
                return _Outcome(bad.reply_to, payload, ok=False)
            return _Outcome(None, None, ok=False, dead_reason=f"unanswerable request: {bad}")

        def error(type: str, message: str, details: dict[str, Any] | None = None) -> _Outcome:
            payload = protocol.encode_error(req.call_id, type, message, wid, details)
            return _Outcome(req.reply_to, payload, ok=False, deadline_ms=req.deadline_ms)

        remaining = req.deadline_ms / 1000 - time.time()
        if remaining <= 0:
            return error(
                "titan.DeadlineExceeded",
                f"{req.method}() was dropped unrun: its deadline passed {-remaining:.3f} s before it started",
            )
        spec = self.definition.methods.get(req.method)
        if spec is None:
            public = ", ".join(sorted(self.definition.methods)) or "none"
            return error(
                "titan.MethodNotFound",
                f"service {self.service!r} has no public method {req.method!r} (public: {public})",
            )
        problem = check_arguments(req.method, spec.signature, req.args, req.kwargs)
        if problem is not None:
            return error("titan.BadArguments", problem)
        if spec.plain and spec.name not in self._invalidates:
            return await self._run(spec, req, remaining, error)
        return await self._run_decorated(spec, req, remaining, error)

    async def _run(
        self, spec: MethodSpec, req: protocol.Request, remaining: float, error: Callable[..., _Outcome]
    ) -> _Outcome:
        """Run the method within the call's deadline and encode its reply."""
        if spec.streaming:
            return await self._run_stream(req, remaining, error)
        method = getattr(self.instance, req.method)
        with anyio.move_on_after(remaining) as scope:
            try:
                if spec.is_async:
                    result = await method(*req.args, **req.kwargs)
                else:
                    result = await anyio.to_thread.run_sync(lambda: method(*req.args, **req.kwargs))
            except Exception as exc:
                return error(
                    type(exc).__name__,
                    str(exc),
                    {"traceback": "".join(traceback.format_exception(exc)[-8:])},
                )
        if scope.cancelled_caught:
            return error("titan.DeadlineExceeded", f"{req.method}() was cancelled: it ran past its deadline")
        return self._reply(req, result, error)

    async def _run_stream(
        self, req: protocol.Request, remaining: float, error: Callable[..., _Outcome]
    ) -> _Outcome:
        """Send an async generator's items as they come, never more than the caller's credit ahead.

        The caller raises its credit as it consumes items and sets ``cancel``
        when it stops early; the producer is then closed, as it is at the
        deadline (a caller that vanished stops granting credit).
        """
        assert self._writer is not None
        control = self.keys.stream_control(self.service, req.call_id)
        credit, cancelled, sent = protocol.STREAM_WINDOW, False, 0
        outcome: _Outcome | None = None

        async def refresh() -> None:
            nonlocal credit, cancelled
            state = await self.redis.hgetall(control)
            credit = max(credit, int(state.get(b"credit", b"0") or 0))
            cancelled = cancelled or bool(state.get(b"cancel"))

        with anyio.move_on_after(remaining) as deadline:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while not cancelled:
                        await anyio.sleep(0.2)
                        await refresh()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                items = getattr(self.instance, req.method)(*req.args, **req.kwargs)
                try:
                    async for item in items:
                        while sent >= credit and not cancelled:
                            await anyio.sleep(0.02)  # the window is full: wait for the caller
                            await refresh()
                        try:
                            payload = protocol.encode_item(req.call_id, sent, item, self.worker_id)
                        except EncodeError as exc:
                            outcome = error(
                                "titan.EncodeError", f"item {sent} of {req.method}() {exc.message}"
                            )
                            break
                        if len(payload) > self.options.max_payload:
                            err = protocol.size_error(f"item {sent} of {req.method}()", len(payload),
                                                      self.options.max_payload)  # fmt: skip
                            outcome = error(err.type, err.message)
                            break
                        await self._writer.execute("XADD", req.reply_to, "*", "reply", payload)
                        sent += 1
                except Exception as exc:
                    outcome = error(
                        type(exc).__name__,
                        str(exc),
                        {"items": sent, "traceback": "".join(traceback.format_exception(exc)[-8:])},
                    )
                finally:
                    with anyio.CancelScope(shield=True):
                        await items.aclose()
                tg.cancel_scope.cancel()
        if cancelled:
            logger.info("worker %s: caller stopped %s() after %d item(s)", self.worker_id, req.method, sent)
            return _Outcome(None, None, ok=True, deadline_ms=req.deadline_ms)  # acknowledged, unanswered
        if deadline.cancelled_caught:
            return error("titan.DeadlineExceeded", f"{req.method}() was cancelled after {sent} item(s): "
                         "it ran past its deadline")  # fmt: skip
        if outcome is not None:
            return outcome
        payload = protocol.encode_end(req.call_id, sent, self.worker_id)
        return _Outcome(req.reply_to, payload, ok=True, deadline_ms=req.deadline_ms)

    def _reply(self, req: protocol.Request, result: Any, error: Callable[..., _Outcome]) -> _Outcome:
        try:
            payload = protocol.encode_ok(req.call_id, result, self.worker_id)
        except EncodeError as exc:
            return error("titan.EncodeError", f"result of {req.method}() {exc.message}")
        if len(payload) > self.options.max_payload:
            err = protocol.size_error(f"result of {req.method}()", len(payload), self.options.max_payload)
            return error(err.type, err.message)
        return _Outcome(req.reply_to, payload, ok=True, deadline_ms=req.deadline_ms, value=result)

    async def _run_decorated(
        self, spec: MethodSpec, req: protocol.Request, remaining: float, error: Callable[..., _Outcome]
    ) -> _Outcome:
        """The call with its @rate_limit, @cache, @trace and @metric."""
        if spec.rate_limit is not None:
            wait = await self._admit(spec, spec.rate_limit, req)
            if wait > 0:
                return error(
                    "titan.RateLimited",
                    f"{req.method}() is limited to {spec.rate_limit.rps:g} calls/s "
                    f"({spec.rate_limit.scope} scope); retry after {wait:.3f} s",
                    {"retry_after": wait},
                )
        generation = b"0"
        if spec.cache is not None:
            hit, value, generation = await self._cache_get(spec, spec.cache, req)
            if hit:
                return self._reply(req, value, error)
        started = time.perf_counter()
        if spec.trace is not None:
            with traced(spec, self.service, req.trace, self.worker_id) as span:
                outcome = await self._run(spec, req, remaining, error)
                if not outcome.ok:
                    span.set_status(otel.Status(otel.StatusCode.ERROR))
        else:
            outcome = await self._run(spec, req, remaining, error)
        if spec.metric is not None:
            self.metrics.observe(spec.metric.name or spec.name, time.perf_counter() - started, outcome.ok)
        if outcome.ok:
            if spec.cache is not None:
                await self._cache_put(spec, spec.cache, req, outcome.value, generation)
            for cached in self._invalidates.get(spec.name, ()):
                await self.redis.incr(self.keys.cache_generation(self.service, cached))
        return outcome

    async def _admit(self, spec: MethodSpec, limit: RateLimitOptions, req: protocol.Request) -> float:
        """0 when the call may run, else the seconds until it could."""
        key = cache_key(limit, req.args, req.kwargs) if limit.key is not None else ""
        if limit.scope == "worker":
            bucket = self._buckets.get((spec.name, key))
            if bucket is None:
                bucket = self._buckets[(spec.name, key)] = LocalBucket(limit.rps, limit.burst)
            return bucket.take()
        bucket_key = self.keys.rate(self.service, spec.name, key)
        wait_ms = await self._evalsha(self.redis, "rate_limit", [bucket_key], [limit.rps, limit.burst])
        return int(wait_ms) / 1000

    async def _cache_get(
        self, spec: MethodSpec, options: CacheOptions, req: protocol.Request
    ) -> tuple[bool, Any, bytes]:
        digest = cache_key(options, req.args, req.kwargs)
        gen_key = self.keys.cache_generation(self.service, spec.name)
        if options.scope == "worker":
            # The generation lives in Redis, so an invalidation holds in every worker at once.
            generation = cast(bytes, await self.redis.get(gen_key) or b"0")
            local = self._caches.setdefault(spec.name, LocalCache(options.maxsize))
            hit, value = local.get(digest, generation)
            return hit, value, generation
        prefix = self.keys.cache_prefix(self.service, spec.name)
        generation, raw = await self._evalsha(self.redis, "cache_get", [gen_key], [prefix, digest])
        if raw is None:
            return False, None, generation
        return True, protocol.unpack(raw), generation

    async def _cache_put(
        self, spec: MethodSpec, options: CacheOptions, req: protocol.Request, value: Any, generation: bytes
    ) -> None:
        digest = cache_key(options, req.args, req.kwargs)
        if options.scope == "worker":
            self._caches.setdefault(spec.name, LocalCache(options.maxsize)).put(
                digest, value, options.ttl, generation
            )
            return
        key = self.keys.cache_prefix(self.service, spec.name) + generation.decode() + ":" + digest
        await self.redis.set(key, protocol.pack(value), px=max(1, int(options.ttl * 1000)))

    async def _ensure_group(self) -> None:
        for stream in (self.stream, self.own_stream):
            try:
                # Id 0: a group made after calls were queued still sees them.
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _record(self) -> dict[FieldT, EncodableT]:
        return {
            "status": self.status,
            "in_flight": str(self.in_flight),
            "calls": str(self.calls),
            "errors": str(self.errors),
            "heartbeat_at": f"{time.time():.3f}",
            "latency": json.dumps(self.latency.to_dict()),
            "unhealthy_streak": str(self.unhealthy_streak),
            "metrics": json.dumps(self.metrics.summary()),
            **({"health": json.dumps(self._health)} if self._health is not None else {}),
        }

    async def _register(self) -> None:
        methods = [m.describe() for m in self.definition.methods.values()]
        self._health = await self._check_health()
        record: dict[FieldT, EncodableT] = {
            "service": self.service,
            "version": self.definition.version,
            "worker_id": self.worker_id,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "concurrency": str(self.options.concurrency),
            **({"metrics_port": str(self.metrics_port)} if self.metrics_port is not None else {}),
            "started_at": f"{self.started_at:.3f}",
            "methods": json.dumps(methods),
            **self._record(),
        }
        description = {
            "name": self.service,
            "version": self.definition.version,
            "description": self.definition.info.description.strip(),
            "methods": methods,
        }
        limits: dict[FieldT, EncodableT] = {
            "max_backlog": self.definition.info.max_backlog,
            "max_deliveries": self.options.max_deliveries or self.definition.info.max_deliveries,
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.record_key, mapping=record)
            pipe.pexpire(self.record_key, int(self.options.heartbeat_ttl * 1000))
            pipe.sadd(self.keys.workers(self.service), self.worker_id)
            pipe.sadd(self.keys.affinity(self.service), self.worker_id)
            pipe.hset(self.keys.services, self.service, json.dumps(description))
            pipe.hset(self.keys.config(self.service), mapping=limits)
            await pipe.execute()

    async def _heartbeat_loop(self) -> None:
        ttl_ms = int(self.options.heartbeat_ttl * 1000)
        next_health = time.monotonic() + self.options.health_interval
        while True:
            await anyio.sleep(self.options.heartbeat_interval)
            parent = self.options.parent_pid
            if parent is not None and os.getppid() != parent and not self._stopping:
                logger.warning("worker %s: its manager (pid %d) is gone; stopping", self.worker_id, parent)
                self.stop()
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + self.options.health_interval
                self._health = await self._check_health()
            try:
                await self._beat(ttl_ms)
            except _REDIS_ERRORS as exc:
                logger.warning("worker %s: heartbeat failed (%s)", self.worker_id, exc)

    async def _beat(self, ttl_ms: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.record_key, mapping=self._record())
            pipe.pexpire(self.record_key, ttl_ms)
            pipe.sadd(self.keys.workers(self.service), self.worker_id)
            added, *_ = await pipe.execute()
        if added:
            # The record had expired (Redis was away longer than the TTL): register anew.
            logger.warning("worker %s: registry record was gone; registering again", self.worker_id)
            await self._register()
        # Only the shared stream's entries can be claimed by others; renew those.
        shared = [entry_id for stream, entry_id in self._active if stream == self.stream]
        if shared:
            renewed = await self._evalsha(
                self.redis, "renew", [self.stream], [GROUP, self.worker_id, *shared]
            )
            logger.debug("worker %s renewed %d in-flight call(s)", self.worker_id, renewed)

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
                else _unhealthy(f"{name}() returned {result!r}, not Health")
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

    async def _deregister(self) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.record_key)
                pipe.srem(self.keys.workers(self.service), self.worker_id)
                await pipe.execute()
            # Calls still waiting on this worker's own stream go to the shared one.
            await self._rescue(self.worker_id)
            pending = await self.redis.xpending_range(
                self.stream, GROUP, min="-", max="+", count=1, consumername=self.worker_id
            )
            if not pending:
                # Only a consumer with nothing pending may go: DELCONSUMER drops its entries.
                await self.redis.xgroup_delconsumer(self.stream, GROUP, self.worker_id)
        except _REDIS_ERRORS as exc:
            logger.warning(
                "worker %s: could not deregister (%s); the record expires by itself",
                self.worker_id,
                exc,
            )
        logger.info("worker %s stopped after %d call(s)", self.worker_id, self.calls)
