"""The calling side: a Client that sends requests and one dispatcher that routes replies, and proxies.

Every call carries an absolute deadline. Replies for all calls of a client
arrive on one list, popped by a single dispatcher task, and are matched to
their callers by call id; a reply nobody waits for (a duplicate, or one for
a caller that gave up) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream
from opentelemetry import propagate
from opentelemetry import trace as otel
from redis import exceptions as rexc

from . import protocol
from .breaker import BreakerState, CircuitBreaker
from .config import resolve_namespace, resolve_url
from .connection import CONNECTION_ERRORS, AutoPipeline, Channel, Redis, open_redis, stream_entries, text
from .errors import (
    BacklogFull,
    CallTimeout,
    NoLiveWorkers,
    RedisUnavailable,
    RemoteError,
    TitanError,
    remote_error,
)
from .keys import Keys
from .scripting import Script

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SUBMIT = Script("submit")
ROUTE_TTL = 1.0
"""Seconds a client trusts its list of a service's workers for affinity routing."""

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BACKLOG = 10_000


class Client:
    """Sends calls to services and receives their replies.

    The constructor does no I/O; ``async with Client(...)`` connects and starts
    the reply dispatcher, leaving the block stops it.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        max_payload: int = protocol.DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.url = resolve_url(url)
        self.namespace = resolve_namespace(namespace)
        self.keys = Keys(self.namespace)
        self.default_timeout = default_timeout
        self.max_backlog = max_backlog
        self.max_payload = max_payload
        self.client_id = uuid.uuid4().hex[:16]
        self._reply_key = self.keys.reply(self.client_id)
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[protocol.Reply]] = {}
        self._streams: dict[str, MemoryObjectSendStream[protocol.Reply]] = {}
        self._redis: Redis | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._sender: AutoPipeline | None = None
        self._channels: list[Channel] = []
        self._routes: dict[str, tuple[float, list[str]]] = {}

    @property
    def redis(self) -> Redis:
        """The connection; raise TitanError when used outside ``async with``."""
        if self._redis is None:
            raise TitanError("client is not connected: use 'async with' first")
        return self._redis

    async def __aenter__(self) -> Client:
        self._redis = await open_redis(self.url)
        try:
            # Calls and replies each get a connection of their own, off the pool.
            sender, receiver = await Channel.open(self.url), await Channel.open(self.url)
            self._channels = [sender, receiver]
            self._sender = AutoPipeline(sender)
        except BaseException:
            await self.aclose()
            raise
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._dispatch, receiver)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the dispatcher and close the connection; calls still waiting fail."""
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TitanError("client closed while the call was waiting"))
        self._pending.clear()
        if self._redis is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._redis.delete(self._reply_key)  # nobody will read it again
        for channel in self._channels:
            await channel.aclose()
        self._channels = []
        self._sender = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _dispatch(self, channel: Channel) -> None:
        """Route replies to their callers.

        Replies arrive on a stream read with XREAD from the last id seen, not
        popped from a list: if Redis goes away before a read's answer reaches
        us, the next read fetches the same replies again. Read replies are
        deleted in batches (at most a second late).
        """
        key = self._reply_key
        last = b"0-0"
        seen: list[bytes] = []
        next_trim = time.monotonic() + 1.0
        backoff = 0.05
        while True:
            try:
                if seen and (len(seen) >= 1024 or time.monotonic() >= next_trim):
                    await channel.execute("XDEL", key, *seen)
                    seen.clear()
                    next_trim = time.monotonic() + 1.0
                res = await channel.execute("XREAD", "COUNT", 256, "BLOCK", 1000, "STREAMS", key, last)
                backoff = 0.05
            except CONNECTION_ERRORS as exc:
                logger.warning("reply dispatcher lost Redis (%s); retrying in %.2f s", exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            entries = stream_entries(res)
            for _stream, entry_id, fields in entries:
                seen.append(entry_id)
                reply = protocol.decode_reply(fields.get(protocol.F_REPLY_VALUE, b""))
                if reply is None:
                    logger.warning("dropped a malformed reply on %s", key)
                    continue
                stream = self._streams.get(reply.call_id)
                if stream is not None:
                    try:
                        stream.send_nowait(reply)
                    except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        logger.warning("dropped an item of stream %s: its reader is gone", reply.call_id)
                    continue
                fut = self._pending.get(reply.call_id)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
            if entries:
                last = entries[-1][1]
                # Let the callers just answered run (and send their next call) before reading again.
                await anyio.lowlevel.checkpoint()

    async def call(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        key: str | None = None,
    ) -> Any:
        """Call ``service.method(*args, **kwargs)`` and return its result.

        Calls with the same ``key`` go to the same worker while the service's
        workers do not change (rendezvous hashing over the live workers), and
        to any worker when that one is gone.

        Raises RemoteError (or a subclass) when the worker answers with an error,
        CallTimeout (NoLiveWorkers when no worker is alive) when the deadline
        passes, BacklogFull when the service refuses new calls, and
        RedisUnavailable when Redis cannot be reached.
        """
        timeout, call_id, fields = self._request(method, args, kwargs, timeout)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[protocol.Reply] = loop.create_future()
        self._pending[call_id] = fut
        try:
            worker = await self._route(service, key) if key is not None else None
            entry_id = await self._send(service, method, fields, worker)
            # A timer on the future is much cheaper than a cancel scope on this hot path.
            timer = loop.call_later(timeout - (time.monotonic() - started), _expire, fut)
            try:
                reply = await fut
            except _Expired:
                pass
            else:
                if reply.seq is not None or reply.end is not None:
                    await self._cancel_stream(service, call_id)
                    raise TitanError(
                        f"{service}.{method}() streams its results: iterate it with 'async for' instead"
                    )
                if reply.ok:
                    return reply.value
                raise _error_of(reply)
            finally:
                timer.cancel()
            # Nobody waits for it any more: drop it if no worker has taken it yet.
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self.redis.xdel(self.keys.calls(service), entry_id)
                if worker is not None:
                    await self.redis.xdel(self.keys.worker_calls(service, worker), entry_id)
            raise await self._timeout_error(service, method, timeout)
        finally:
            self._pending.pop(call_id, None)

    async def stream(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        key: str | None = None,
    ) -> AsyncIterator[Any]:
        """Iterate over the items a streaming (async generator) method yields, as they come.

        The worker runs at most STREAM_WINDOW items ahead of this iterator.
        Leaving the loop early stops the producer. An error raised by the
        producer is raised here after the items it sent. ``timeout`` bounds
        the whole stream. Raises like ``call``.
        """
        timeout, call_id, fields = self._request(method, args, kwargs, timeout)
        deadline = time.monotonic() + timeout
        window = protocol.STREAM_WINDOW
        send, receive = anyio.create_memory_object_stream[protocol.Reply](window * 2 + 8)
        self._streams[call_id] = send
        finished = False
        try:
            worker = await self._route(service, key) if key is not None else None
            await self._send(service, method, fields, worker)
            received = 0
            while True:
                reply = None
                with anyio.move_on_after(deadline - time.monotonic()):
                    reply = await receive.receive()
                if reply is None:
                    raise await self._timeout_error(service, method, timeout)
                if not reply.ok:
                    finished = True
                    raise _error_of(reply)
                if reply.end is not None:
                    finished = True
                    return
                if reply.seq is None:
                    finished = True
                    raise TitanError(f"{service}.{method}() does not stream: await it instead of iterating")
                if reply.seq < received:
                    continue  # replayed from the start by a worker that took the call over
                received += 1
                yield reply.value
                if received % (window // 2) == 0:
                    await self._grant(service, call_id, received + window)
        finally:
            self._streams.pop(call_id, None)
            send.close()
            receive.close()
            if not finished:
                with anyio.CancelScope(shield=True):
                    await self._cancel_stream(service, call_id)

    def _request(
        self, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None, timeout: float | None
    ) -> tuple[float, str, dict[bytes, bytes]]:
        """The timeout to use, a new call id, and the request entry's fields (deadline included)."""
        timeout = self.default_timeout if timeout is None else timeout
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        call_id = f"{self.client_id}-{next(self._ids)}"
        fields = protocol.encode_request(
            call_id, method, args, kwargs or {}, self._reply_key, int(timeout * 1000),
            trace=_traceparent(), max_payload=self.max_payload,
        )  # fmt: skip
        return timeout, call_id, fields

    async def _grant(self, service: str, call_id: str, credit: int) -> None:
        key = self.keys.stream_control(service, call_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, "credit", credit)
            pipe.pexpire(key, 600_000)
            await pipe.execute()

    async def _cancel_stream(self, service: str, call_id: str) -> None:
        """Tell the worker to stop producing (the caller left early or gave up)."""
        key = self.keys.stream_control(service, call_id)
        with contextlib.suppress(*CONNECTION_ERRORS):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, "cancel", 1)
                pipe.pexpire(key, 600_000)
                await pipe.execute()

    async def _route(self, service: str, key: str) -> str | None:
        """The live worker that ``key`` maps to (rendezvous hashing), or None when none is known."""
        cached = self._routes.get(service)
        if cached is None or cached[0] < time.monotonic():
            ids = sorted(text(w) for w in await self.redis.smembers(self.keys.affinity(service)))
            async with self.redis.pipeline(transaction=False) as pipe:
                for wid in ids:
                    pipe.exists(self.keys.worker(service, wid))
                alive = await pipe.execute()
            cached = (time.monotonic() + ROUTE_TTL, [w for w, a in zip(ids, alive, strict=True) if a])
            self._routes[service] = cached
        workers = cached[1]
        if not workers:
            return None
        return max(
            workers, key=lambda wid: hashlib.blake2b(f"{key}\x00{wid}".encode(), digest_size=8).digest()
        )

    async def _send(self, service: str, method: str, fields: dict[bytes, bytes], worker: str | None) -> bytes:
        assert self._sender is not None, "client is not connected"
        shared = self.keys.calls(service)
        keys = [shared, self.keys.config(service)]
        if worker is not None:
            keys = [
                self.keys.worker_calls(service, worker),
                keys[1],
                self.keys.worker(service, worker),
                shared,
            ]
        argv: list[Any] = [self.max_backlog]
        for name, value in fields.items():
            argv += (name, value)
        try:
            return cast(bytes, await _SUBMIT(self._sender, keys, argv))
        except rexc.ResponseError as exc:
            if str(exc).startswith("TITANBACKLOG"):
                limit = str(exc).split()[-1]
                raise BacklogFull(
                    f"service {service!r} refused {method}(): its backlog is full "
                    f"({limit} calls waiting, max_backlog={limit}); add workers or retry later"
                ) from None
            raise
        except CONNECTION_ERRORS as exc:
            raise RedisUnavailable(f"cannot send {service}.{method}(): Redis is unreachable ({exc})") from exc

    async def _timeout_error(self, service: str, method: str, timeout: float) -> CallTimeout:
        try:
            live = await self.live_workers(service)
        except CONNECTION_ERRORS:
            live = -1
        if live == 0:
            return NoLiveWorkers(
                f"{service}.{method}() got no answer within {timeout:g} s: "
                f"service {service!r} has no live worker (start one with 'titan-worker run FILE')"
            )
        return CallTimeout(f"{service}.{method}() got no answer within {timeout:g} s")

    async def live_workers(self, service: str) -> int:
        """How many workers of ``service`` have a live registry record."""
        ids = await self.redis.smembers(self.keys.workers(service))
        if not ids:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.exists(self.keys.worker(service, text(wid)))
            found = await pipe.execute()
        return sum(int(x) for x in found)

    def proxy(
        self,
        service: str,
        cls: type[T] | None = None,
        *,
        methods: frozenset[str] | None = None,
        breaker: CircuitBreaker | None = None,
        streaming: frozenset[str] = frozenset(),
    ) -> T:
        """A proxy whose attribute calls go to ``service``; typed as ``cls`` for type checkers.

        Methods named in ``streaming`` return async iterators; ``connect`` fills
        it in from the registry.
        """
        proxy = ServiceProxy(
            self, service, methods=methods, timeout=None, breaker=breaker, streaming=streaming
        )
        return cast(T, proxy)

    async def streaming_methods(self, service: str) -> frozenset[str]:
        """The streaming methods of ``service`` as its workers registered them (empty if unknown)."""
        raw = await self.redis.hget(self.keys.services, service)
        if not raw:
            return frozenset()
        methods = json.loads(raw).get("methods", [])
        return frozenset(m["name"] for m in methods if m.get("streaming"))

    async def invalidate_cache(self, service: str, method: str) -> None:
        """Drop every cached result of ``service.method`` (@cache), in every worker, at once."""
        await self.redis.incr(self.keys.cache_generation(service, method))


def _error_of(reply: protocol.Reply) -> RemoteError:
    """The exception an error reply stands for."""
    error = reply.error or {}
    details = error.get("details")
    return remote_error(
        str(error.get("type", "titan.Unknown")),
        str(error.get("message", "")),
        details if isinstance(details, dict) else None,
    )


def _traceparent() -> str | None:
    """The W3C traceparent of the caller's current span, when tracing is on."""
    if not otel.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


class _Expired(Exception):
    """Set on a call's future when its timeout passes."""


def _expire(fut: asyncio.Future[protocol.Reply]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class ServiceProxy:
    """Calls the methods of a service by attribute: ``await proxy.add(1, 2)``.

    A proxy addresses the service, not one process: any live worker may answer.
    """

    __slots__ = ("_breaker", "_client", "_key", "_methods", "_service", "_streaming", "_timeout")

    def __init__(
        self,
        client: Client,
        service: str,
        *,
        methods: frozenset[str] | None,
        timeout: float | None,
        key: str | None = None,
        breaker: CircuitBreaker | BreakerState | None = None,
        streaming: frozenset[str] = frozenset(),
    ) -> None:
        self._client = client
        self._service = service
        self._methods = methods
        self._streaming = streaming
        self._timeout = timeout
        self._key = key
        self._breaker = BreakerState(breaker, service) if isinstance(breaker, CircuitBreaker) else breaker

    @property
    def circuit(self) -> str | None:
        """The circuit breaker's state (closed, open, half-open), or None without one."""
        return self._breaker.state if self._breaker is not None else None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._methods is not None and name not in self._methods:
            known = ", ".join(sorted(self._methods)) or "none"
            raise AttributeError(f"service {self._service!r} has no public method {name!r} (public: {known})")
        kind = _StreamingMethod if name in self._streaming else _RemoteMethod
        return kind(self._client, self._service, name, self._timeout, self._key, self._breaker)

    def with_options(self, *, timeout: float | None = None, key: str | None = None) -> ServiceProxy:
        """A copy of this proxy whose calls use these options.

        ``timeout``: seconds each call may take. ``key``: calls with the same
        key go to the same worker while the pool does not change (for
        stateful services), and to any worker when that one is gone.
        """
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        return ServiceProxy(
            self._client,
            self._service,
            methods=self._methods,
            timeout=timeout if timeout is not None else self._timeout,
            key=key if key is not None else self._key,
            breaker=self._breaker,
            streaming=self._streaming,
        )

    def __repr__(self) -> str:
        return f"<ServiceProxy {self._service!r} in namespace {self._client.namespace!r}>"


class _RemoteMethod:
    __slots__ = ("_breaker", "_client", "_key", "_method", "_service", "_timeout")

    def __init__(
        self,
        client: Client,
        service: str,
        method: str,
        timeout: float | None,
        key: str | None,
        breaker: BreakerState | None,
    ) -> None:
        self._client = client
        self._service = service
        self._method = method
        self._timeout = timeout
        self._key = key
        self._breaker = breaker

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        breaker = self._breaker
        if breaker is None:
            return await self._client.call(
                self._service, self._method, args, kwargs, timeout=self._timeout, key=self._key
            )
        breaker.before_call()
        try:
            result = await self._client.call(
                self._service, self._method, args, kwargs, timeout=self._timeout, key=self._key
            )
        except BaseException as exc:
            breaker.after_call(exc)
            raise
        breaker.after_call(None)
        return result

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """Iterate over the items of a streaming method (what calling one through a proxy does)."""
        breaker = self._breaker
        if breaker is not None:
            breaker.before_call()
        try:
            async for item in self._client.stream(
                self._service, self._method, args, kwargs, timeout=self._timeout, key=self._key
            ):
                yield item
        except Exception as exc:
            if breaker is not None:
                breaker.after_call(exc)
            raise
        if breaker is not None:
            breaker.after_call(None)

    def __repr__(self) -> str:
        return f"<remote method {self._service}.{self._method}>"


class _StreamingMethod(_RemoteMethod):
    """A method that streams: calling it gives an async iterator, not a coroutine."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        return self.stream(*args, **kwargs)


def with_options(proxy: T, *, timeout: float | None = None, key: str | None = None) -> T:
    """``proxy.with_options(...)`` for typed code: the proxy's static type is the service class.

    Raises TypeError when ``proxy`` is not a titan-broker proxy.
    """
    if not isinstance(proxy, ServiceProxy):
        raise TypeError(f"with_options() takes a proxy from spawn/connect, not {type(proxy).__name__}")
    return cast(T, proxy.with_options(timeout=timeout, key=key))
