"""The worker runtime: serve one service's request stream through the consumer group.

A worker is a task group: a heartbeat task and a read loop, and one task per
call in flight. It reads no more entries than it has free slots, so it never
holds work that an idle sibling could do. An entry is acknowledged and
deleted only in the same transaction that writes its reply, after the reply.
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
from redis import exceptions as rexc
from redis.typing import EncodableT, FieldT

from titan_broker import protocol
from titan_broker.config import WorkerOptions, check_name, redact
from titan_broker.connection import CONNECTION_ERRORS, AutoPipeline, Redis, open_dedicated, open_redis
from titan_broker.decorators import Health
from titan_broker.definition import ServiceDefinition
from titan_broker.errors import EncodeError, TitanError
from titan_broker.keys import GROUP, Keys

logger = logging.getLogger(__name__)


_ReadResponse = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes] | None]]]] | None


# Reply first, then acknowledge and delete, atomically: if the reply cannot be
# written (say Redis is out of memory) the script stops before XACK and the
# entry stays pending for another try.
_FINISH = """
if KEYS[2] then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""


class InitError(TitanError):
    """The service's ``init()`` raised."""


@dataclass(frozen=True)
class _Outcome:
    reply_to: str | None
    payload: bytes | None
    ok: bool


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
        self.record_key = self.keys.worker(self.service, self.worker_id)
        self.instance: Any = None
        self.status = "starting"
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self._stopping = False
        self._reading = False
        self._slot_freed: anyio.Event | None = None
        self._stop_requested: anyio.Event | None = None
        self._redis: Redis | None = None
        self._reader: Redis | None = None
        self._reader_id: int | None = None
        self._finish_sha = ""
        self._writer: AutoPipeline | None = None
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
        writer: Redis | None = None
        try:
            self._reader = await open_dedicated(self.url)
            self._reader_id = await self._reader.client_id()
            writer = await open_dedicated(self.url)
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
            self._finish_sha = await self.redis.script_load(_FINISH)
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
        async with anyio.create_task_group() as calls:
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

    async def _read_until_stopped(self, calls: anyio.abc.TaskGroup, reader: Redis, block_ms: int) -> None:
        backoff = 0.05
        while not self._stopping:
            free = self.options.concurrency - self.in_flight
            if free <= 0:
                await self._wait_slot_change()
                continue
            try:
                response: _ReadResponse = await reader.xreadgroup(  # type: ignore[assignment]
                    GROUP, self.worker_id, {self.stream: ">"}, count=free, block=block_ms
                )
                backoff = 0.05
            except rexc.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()
                continue
            except CONNECTION_ERRORS as exc:
                logger.warning("worker %s lost Redis (%s); retrying in %.2f s", self.worker_id, exc, backoff)
                self._reader_id = None
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                with contextlib.suppress(*CONNECTION_ERRORS):
                    self._reader_id = await reader.client_id()
                continue
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    self.in_flight += 1
                    calls.start_soon(self._handle, entry_id, fields or {})
            # Let the new calls run (and a quick one reply) before the next read is sent.
            await anyio.lowlevel.checkpoint()

    async def _handle(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            outcome = await self._execute(fields)
            self.calls += 1
            if not outcome.ok:
                self.errors += 1
            await self._finish(entry_id, outcome)
        finally:
            self.in_flight -= 1
            assert self._slot_freed is not None
            self._slot_freed.set()

    async def _finish(self, entry_id: bytes, outcome: _Outcome) -> None:
        assert self._writer is not None
        keys = [self.stream]
        if outcome.reply_to is not None and outcome.payload is not None:
            keys.append(outcome.reply_to)
        args = [entry_id, GROUP, outcome.payload or b"", int(self.options.reply_ttl * 1000)]
        try:
            await self._writer.execute("EVALSHA", self._finish_sha, len(keys), *keys, *args)
        except rexc.NoScriptError:  # Redis restarted without its script cache
            self._finish_sha = await self.redis.script_load(_FINISH)
            await self._writer.execute("EVALSHA", self._finish_sha, len(keys), *keys, *args)

    async def _execute(self, fields: dict[bytes, bytes]) -> _Outcome:
        wid = self.worker_id
        try:
            req = protocol.decode_request(fields, max_payload=self.options.max_payload)
        except protocol.BadEntry as bad:
            logger.warning("worker %s: bad request entry: %s", wid, bad)
            if bad.call_id and bad.reply_to:
                payload = protocol.encode_error(bad.call_id, bad.type, str(bad), wid)
                return _Outcome(bad.reply_to, payload, ok=False)
            return _Outcome(None, None, ok=False)

        def error(type: str, message: str, details: dict[str, Any] | None = None) -> _Outcome:
            payload = protocol.encode_error(req.call_id, type, message, wid, details)
            return _Outcome(req.reply_to, payload, ok=False)

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
        try:
            spec.signature.bind(*req.args, **req.kwargs)
        except TypeError as exc:
            return error("titan.BadArguments", f"{spec.display}: {exc}")
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
        try:
            payload = protocol.encode_ok(req.call_id, result, wid)
        except EncodeError as exc:
            return error("titan.EncodeError", f"result of {req.method}() {exc.message}")
        if len(payload) > self.options.max_payload:
            err = protocol.size_error(f"result of {req.method}()", len(payload), self.options.max_payload)
            return error(err.type, err.message)
        return _Outcome(req.reply_to, payload, ok=True)

    async def _ensure_group(self) -> None:
        try:
            # Id 0: a group made after calls were queued still sees them.
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
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
            **({"health": json.dumps(self._health)} if self._health is not None else {}),
        }

    async def _register(self) -> None:
        methods = [m.describe() for m in self.definition.methods.values()]
        self.status = "ready"
        self._health = await self._check_health()
        record: dict[FieldT, EncodableT] = {
            "service": self.service,
            "version": self.definition.version,
            "worker_id": self.worker_id,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "concurrency": str(self.options.concurrency),
            "started_at": f"{time.time():.3f}",
            "methods": json.dumps(methods),
            **self._record(),
        }
        description = {
            "name": self.service,
            "version": self.definition.version,
            "description": self.definition.info.description.strip(),
            "methods": methods,
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.record_key, mapping=record)
            pipe.pexpire(self.record_key, int(self.options.heartbeat_ttl * 1000))
            pipe.sadd(self.keys.workers(self.service), self.worker_id)
            pipe.hset(self.keys.services, self.service, json.dumps(description))
            await pipe.execute()

    async def _heartbeat_loop(self) -> None:
        ttl_ms = int(self.options.heartbeat_ttl * 1000)
        beats = 0
        while True:
            await anyio.sleep(self.options.heartbeat_interval)
            beats += 1
            if beats % 10 == 0:
                self._health = await self._check_health()
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.hset(self.record_key, mapping=self._record())
                    pipe.pexpire(self.record_key, ttl_ms)
                    await pipe.execute()
            except CONNECTION_ERRORS as exc:
                logger.warning("worker %s: heartbeat failed (%s)", self.worker_id, exc)

    async def _check_health(self) -> dict[str, Any] | None:
        name = self.definition.health_check
        if name is None:
            return None
        try:
            with anyio.fail_after(5.0):
                result = getattr(self.instance, name)()
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            return {
                "status": "unhealthy",
                "checks": {},
                "details": {"error": f"{type(exc).__name__}: {exc}"},
            }
        if isinstance(result, Health):
            return result.to_dict()
        return {
            "status": "unhealthy",
            "checks": {},
            "details": {"error": f"returned {result!r}, not Health"},
        }

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
            pending = await self.redis.xpending_range(
                self.stream, GROUP, min="-", max="+", count=1, consumername=self.worker_id
            )
            if not pending:
                # Only a consumer with nothing pending may go: DELCONSUMER drops its entries.
                await self.redis.xgroup_delconsumer(self.stream, GROUP, self.worker_id)
        except CONNECTION_ERRORS as exc:
            logger.warning(
                "worker %s: could not deregister (%s); the record expires by itself",
                self.worker_id,
                exc,
            )
        logger.info("worker %s stopped after %d call(s)", self.worker_id, self.calls)
