"""The calling side: a Client sends requests; its ReplyDispatcher (replies.py) routes the replies back.

A call is bounded by its timeout from start to finish: routing, sending and
waiting all end at its deadline, and what happens after (deleting a request
nobody waits for) runs in the background and never delays the error. A call
given up for any reason (timeout, cancellation, an error) has its request
deleted if no worker took it, so that no worker runs it later; and a request
that reaches Redis after its caller's deadline (it sat in a socket while Redis
was stopped) is refused by the submit script. Replies arrive on one stream per
client; every error out of this module is a TitanError.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import anyio.abc
import redis.exceptions as rexc
from opentelemetry import propagate
from opentelemetry import trace as otel

from .._config import check_name, check_seconds, redact, resolve_namespace, resolve_url, url_user
from .._errors import AccessDenied, ConfigError, TitanError
from .._redis.connection import REDIS_ERRORS, Redis, open_redis, text, titan_error
from .._redis.denied import acting, is_denied
from .._redis.topology import discover
from .._wire import protocol
from .._wire.acl import USER_NAME, USER_SEPARATOR
from .._wire.keys import Keys
from .breaker import CircuitBreaker
from .jobs import DEFAULT_RESULT_TTL, Job
from .links import Link, Links
from .proxy import ServiceProxy as ServiceProxy
from .proxy import with_options as with_options
from .replies import Placement, ReplyDispatcher, error_of
from .routing import ROUTE_TTL as ROUTE_TTL
from .routing import LiveWorkers, Shards, probe_margin
from .sending import DelayOrJob, Sender, Submit, redis_error, unanswered
from .streaming import StreamRequest, stream_items

logger = logging.getLogger(__name__)

T = TypeVar("T")

CLOSE_BUDGET = 1.0
"""Seconds ``aclose`` spends on its last writes to Redis."""
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BACKLOG = 10_000
"""Seconds a job's outcome is kept after it ended."""


def client_id(user: str | None, random_part: str) -> str:
    """``<user>.<random>``: the ACL rules match a user's reply keys and call ids by this prefix
    (a name they cannot match, or none, leaves the random part alone)."""
    if user is None or not USER_NAME.match(user):
        return random_part
    return f"{user}{USER_SEPARATOR}{random_part}"


class Client:
    """Sends calls to services and receives their replies.

    The constructor does no I/O; ``async with Client(...)`` connects and starts
    the reply dispatcher, leaving the block stops it. Its client id starts with
    the ACL user's name (``acl_user``, else ``ACL WHOAMI`` at connect, else the
    URL's user when the rule refuses WHOAMI), which the rules of ``titan acl
    caller`` match to keep users' replies apart.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        max_payload: int = protocol.DEFAULT_MAX_PAYLOAD,
        acl_user: str | None = None,
    ) -> None:
        self.url = resolve_url(url)
        self.namespace = resolve_namespace(namespace)
        self.keys = Keys(self.namespace)
        self.default_timeout = default_timeout
        self.max_backlog = max_backlog
        self.max_payload = max_payload
        self.acl_user = acl_user
        self._random_id = self.client_id = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)
        self._redis: Redis | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._links: Links | None = None
        self._reply_keys: dict[str, str] = {}
        self._workers = LiveWorkers(self.keys, lambda: self.redis)
        self._shards = Shards(self.keys, lambda: self.redis)
        self._names: set[str] = set()
        """Service names checked already (a name goes into key names: no braces, globs or ``#``)."""

    @property
    def redis(self) -> Redis:
        """The connection; raise TitanError when used outside ``async with``."""
        if self._redis is None:
            raise TitanError("client is not connected: use 'async with' first")
        return self._redis

    def _connected(self) -> Links:
        if self._links is None or self._tg is None:
            raise TitanError("client is not connected: use 'async with' first")
        return self._links

    async def _link(self, service: str, deadline: float) -> Link:
        """The link to ``service`` (its sender and reply dispatcher), opened by ``deadline`` if need be."""
        return await self._connected().open(service, deadline)

    async def __aenter__(self) -> Client:
        try:
            topology = await discover(self.url)
            self._redis = await open_redis(topology)
            user = await self._whoami()
            self.client_id = client_id(user, self._random_id)
            self._shards.user = user if user is not None and USER_NAME.fullmatch(user) else None
            acting.set(replace(acting.get(), user=user))
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, REDIS_ERRORS):
                raise titan_error(exc, f"connect to Redis at {redact(self.url)}") from exc
            raise
        self._links = Links(topology, self.keys, self.client_id, self.max_backlog, lambda: self.redis)
        self._links.user_of = self._shards.user_for
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._links.tg = self._workers.tg = self._shards.tg = self._tg
        return self

    async def _whoami(self) -> str | None:
        """The ACL user this client is: the one given, else ``ACL WHOAMI``, else (a rule without
        ``+acl|whoami``) the one the URL logs in as; None on a Redis without ACLs."""
        if self.acl_user is not None:
            return self.acl_user
        try:
            return text(await self.redis.execute_command("ACL", "WHOAMI"))
        except rexc.NoPermissionError:
            # The connection logged in as the URL's user (no user: "default"); without its name the
            # client id would not match the rule's reply keys, and every call would be refused.
            return url_user(self.url) or "default"
        except rexc.ResponseError:  # a Redis without ACLs: no rule to match
            return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the dispatchers and close the connections; calls still waiting fail.

        Requests given up and not yet deleted, and streams still open, get one
        last try (at most a second), then the reply streams are deleted.
        """
        tg, self._tg = self._tg, None
        links: list[Link] = []
        if self._links is not None:
            self._links.tg = self._workers.tg = None
            links = self._links.detach()
        for link in links:
            link.abandon(self.keys, lambda: TitanError("client closed while the call was waiting"))
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        if self._redis is not None and links:
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + CLOSE_BUDGET
                for link in links:
                    try:
                        await link.clean_up(self._redis)
                    except REDIS_ERRORS as exc:
                        logger.warning("client %s: could not clean up on close (%s)", self.client_id, exc)
        for link in links:
            await link.aclose()
        self._links = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def call(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        key: str | None = None,
        wait_for_worker: bool = True,
        delay: float | None = None,
    ) -> Any:
        """Call ``service.method(*args, **kwargs)`` and return its result.

        Calls with the same ``key`` go to the same worker while the service's
        workers do not change (rendezvous hashing over the live workers), and
        to any worker when that one is gone. With ``wait_for_worker=False`` a
        call to a service with no live worker raises NoLiveWorkers at once
        instead of waiting in the queue for one to start. With ``delay`` the
        call starts no earlier than ``delay`` seconds from now (and the timeout
        counts from then); it goes to any worker.

        Returns or raises by the call's deadline (``timeout`` seconds from now),
        whatever Redis does. Raises RemoteError (or a subclass) when the worker
        answers with an error; CallTimeout (NoLiveWorkers when no worker is
        alive) when the deadline passes; BacklogFull when the service refuses
        new calls; CallLost when Redis lost the call (it restarted without its
        data, or the reply stream was overwritten); RedisUnavailable when
        Redis cannot be reached or does not answer in time (RedisOutOfMemory
        when it is full).
        """
        self._check_name(service)
        loop = asyncio.get_running_loop()
        later = _later(delay, key)
        now = loop.time()
        if not wait_for_worker:  # before a link opens: no connections for a service nobody serves
            self._connected()
            timeout = check_seconds("timeout", self.default_timeout if timeout is None else timeout)
            await self._workers.require_worker(service, method, now + timeout)
        if self._shards.unread(service):  # a first call: its user's stream, or the shared one?
            await self._shards.ready(
                service, now + check_seconds("timeout", self.default_timeout if timeout is None else timeout)
            )
        # The shard the call goes to: its stream, its reply stream and its link. Calls with a key
        # or a delay go to the first shard, where the workers' own streams and the delayed set are.
        scope = self._shards.next_scope(service) if later is None and key is None else service
        timeout, call_id, fields = self._request(scope, method, args, kwargs, timeout)
        deadline = now + timeout + (later.delay_ms / 1000 if later else 0.0)
        link = self._links.get(scope, now) if self._links is not None else None
        if link is None:
            link = await self._link(scope, deadline)
        dispatcher, sender = link.dispatcher, link.sender
        fut: asyncio.Future[protocol.Reply] = loop.create_future()
        dispatcher.expect(call_id, fut)
        sent: Placement | None = None
        submit: Submit | None = None
        answered = False
        try:
            worker = (
                await self._workers.worker_for(service, method, key, deadline) if key is not None else None
            )
            if later is None:
                # Sent without waiting for Redis's answer: the call waits for its reply at once (one
                # wake-up a call, not two); the answer registers where the request went, or, when
                # the submit failed, wakes the call to raise its error or send again.
                submit = sender.submit(scope, fields, worker, deadline, now)
                submit.tried.add_done_callback(
                    functools.partial(_submitted, sender, dispatcher, call_id, fut, submit)
                )
            else:
                sent = await sender.send(scope, method, fields, worker, deadline, timeout, later)
                dispatcher.placed(call_id, sent)
            while True:
                # A timer on the future is much cheaper than a cancel scope on this hot path.
                timer = _CallTimer(loop, fut, deadline, probe_margin(timeout), self._workers.probe, service)
                try:
                    reply = await fut
                    break
                except _Expired:
                    if submit is not None and not submit.tried.done():
                        raise unanswered(f"send {service}.{method}()", timeout) from None
                    raise self._workers.timeout_error(
                        service, method, timeout, loop.time() - timeout
                    ) from None
                except AccessDenied:
                    # The reply read was refused: when this call's send was refused too, that is its
                    # error (it was not sent, so it did not run), whichever Redis answered first.
                    if submit is not None:
                        tried = submit.tried
                        if not tried.done():
                            await asyncio.wait((tried,), timeout=max(0.0, deadline - loop.time()))
                        error = tried.exception() if tried.done() and not tried.cancelled() else None
                        if isinstance(error, Exception) and is_denied(error):
                            await sender.refused(error, service, method, _SUBMIT_COMMAND, submit.key,
                                                 deadline)  # fmt: skip
                    raise
                except _SubmitFailed as failed:
                    assert submit is not None
                    # Raises its error, or returns for a try again (by send, which waits for Redis).
                    await sender.refused(failed.error, service, method, _SUBMIT_COMMAND, submit.key,
                                         deadline)  # fmt: skip
                    submit = None
                    fut = loop.create_future()
                    dispatcher.expect(call_id, fut)
                    sent = await sender.send(scope, method, fields, worker, deadline, timeout)
                    dispatcher.placed(call_id, sent)
                finally:
                    timer.cancel()
            answered = True
            if reply.seq is not None or reply.end is not None:
                _give_up(sender, submit, sent, deadline, self.keys.stream_control(scope, call_id), call_id)
                raise TitanError(
                    f"{service}.{method}() streams its results: iterate it with 'async for' instead"
                )
            if reply.ok:
                return reply.value
            raise error_of(reply)
        finally:
            dispatcher.forget(call_id)
            if not answered:
                _give_up(sender, submit, sent, deadline, None, call_id)
                if fut.done() and not fut.cancelled():
                    # The reply reader failed it while this call was not waiting on it (sending, or
                    # routing): the call raised its own error, this one is not to be logged as lost.
                    fut.exception()

    def stream(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        key: str | None = None,
        wait_for_worker: bool = True,
    ) -> AsyncGenerator[Any, None]:
        """Iterate over the items a streaming (async generator) method yields, as they come.

        The worker runs at most 32 items ahead of this iterator.
        Leaving the loop early stops the producer (and deletes the request if
        no worker took it yet). An error raised by the producer is raised here
        after the items it sent. ``timeout`` bounds the whole stream. Raises
        like ``call``.
        """
        self._check_name(service)
        self._connected()
        scope = self._shards.next_scope(service) if key is None else service
        timeout, call_id, fields = self._request(scope, method, args, kwargs, timeout)
        request = StreamRequest(service, scope, method, call_id, fields, timeout, key, wait_for_worker)

        async def link_for(scope: str, deadline: float) -> Link:
            await self._shards.ready(service, deadline)  # the first call: its user's stream, or not
            return await self._link(scope, deadline)

        return stream_items(request, link_for, self._workers, self.keys)

    def _check_name(self, service: str) -> None:
        """ConfigError for a service name that cannot be one (checked once per name)."""
        if service not in self._names:
            check_name(service, "service name")
            if len(self._names) > 4096:  # bounded whatever names callers use
                self._names.clear()
            self._names.add(service)

    def _request(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        timeout: float | None,
    ) -> tuple[float, str, dict[bytes, bytes]]:
        """The timeout to use, a new call id, and the request entry's fields (timeout included)."""
        timeout = self.default_timeout if timeout is None else timeout
        timeout = check_seconds("timeout", timeout)
        call_id = f"{self.client_id}-{next(self._ids)}"
        reply_key = self._reply_keys.get(service)
        if reply_key is None:
            if len(self._reply_keys) > 4096:  # bounded whatever names callers use
                self._reply_keys.clear()
            reply_key = self._reply_keys[service] = self.keys.reply(service, self.client_id)
        fields = protocol.encode_request(
            call_id, method, args, kwargs or {}, reply_key, int(timeout * 1000),
            trace=_traceparent(), max_payload=self.max_payload,
        )  # fmt: skip
        return timeout, call_id, fields

    async def submit(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        delay: float | None = None,
        deadline: float | None = None,
        result_ttl: float = DEFAULT_RESULT_TTL,
        timeout: float | None = None,
    ) -> str:
        """Queue ``service.method(*args, **kwargs)`` as a job and return its id, without waiting for it.

        The job runs once a worker is free (after ``delay`` seconds, if given),
        whether or not this client is still there, and its outcome is kept
        ``result_ttl`` seconds after it ends: read it with ``job(id)`` from
        any process. ``deadline``: seconds the job may take from its start
        (default: none). ``timeout`` bounds the submit itself. Raises like
        ``call`` for the submit (BacklogFull, RedisUnavailable, ...).
        """
        if deadline is not None:
            check_seconds("deadline", deadline)
        check_seconds("result_ttl", result_ttl)
        timeout = self.default_timeout if timeout is None else timeout
        self._check_name(service)
        later = _later(delay, None) or DelayOrJob()
        token = uuid.uuid4().hex
        job_id = f"{service}:{token}"
        ttl_ms = int(deadline * 1000) if deadline is not None else protocol.NO_DEADLINE_MS
        fields = protocol.encode_request(
            f"{self.client_id}-{next(self._ids)}", method, args, kwargs or {}, None, ttl_ms,
            trace=_traceparent(), max_payload=self.max_payload, job=token,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        await self._shards.ready(service, until)
        link = await self._link(service, until)
        later = later._replace(job_id=job_id, result_ttl_ms=int(result_ttl * 1000))
        await link.sender.send(service, method, fields, None, until, timeout, later)
        return job_id

    def job(self, job_id: str, decode: Callable[[Any], T] | None = None) -> Job[T]:
        """The job with this id (from ``submit``, in this process or another)."""
        # The Redis this client sends the service's calls to, as its link knows it: a job submitted
        # here was there, so a later restart that lost it can be told (see Job).
        service = job_id.partition(":")[0]
        run_id = self._links.run_id(service) if self._links is not None else None
        return Job(lambda: self.redis, self.keys, job_id, decode, run_id)

    async def live_workers(self, service: str) -> int:
        """How many workers of ``service`` have a live registry record."""
        try:
            return await self._workers.count_live(service)
        except REDIS_ERRORS as exc:
            raise titan_error(
                exc, f"count the workers of {service!r}", command="SMEMBERS", key=self.keys.workers(service)
            ) from exc

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

        Calling a method gives an object to await (its result) or to iterate
        with ``async for`` (a streaming method's items), whatever the proxy
        knew of the service when it was made; ``streaming`` is informative.
        Results are decoded into ``cls``'s return annotations (plain data
        without ``cls``).
        """
        proxy = ServiceProxy(
            self, service, methods=methods, timeout=None, breaker=breaker, streaming=streaming, cls=cls
        )
        return cast(T, proxy)

    async def streaming_methods(self, service: str) -> frozenset[str]:
        """The streaming methods of ``service`` as its workers registered them (empty if unknown)."""
        try:
            raw = await self.redis.hget(self.keys.services, service)
        except REDIS_ERRORS as exc:
            raise titan_error(exc, f"read the registry entry of {service!r}") from exc
        try:
            methods = json.loads(raw).get("methods", []) if raw else []
            return frozenset(m["name"] for m in methods if m.get("streaming"))
        except (ValueError, TypeError, AttributeError, KeyError):
            return frozenset()  # an entry this version cannot read: the proxy works without it

    async def invalidate_cache(self, service: str, method: str) -> None:
        """Drop every cached result of ``service.method`` (@cache), in every worker, at once."""
        try:
            await self.redis.incr(self.keys.cache_generation(service, method))
        except REDIS_ERRORS as exc:
            doing = f"invalidate the cache of {service}.{method}()"
            raise await redis_error(self.redis, exc, doing, anyio.current_time() + 1.0) from exc


def _later(delay: float | None, key: str | None) -> DelayOrJob | None:
    """How a call with ``delay`` goes out (None: at once); raise ConfigError for a bad one."""
    if delay is None or (delay == 0 and not isinstance(delay, bool)):
        return None
    check_seconds("delay", delay)
    if key is not None:
        raise ConfigError("a delayed call goes to any worker: it cannot have an affinity key")
    return DelayOrJob(delay_ms=int(delay * 1000))


def _traceparent() -> str | None:
    """The W3C traceparent of the caller's current span, when tracing is on."""
    if not otel.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


_SUBMIT_COMMAND = "EVALSHA submit_many"
"""What an ordinary call's send runs, as an AccessDenied names it."""


class _Expired(Exception):
    """Set on a call's future when its timeout passes."""


class _SubmitFailed(Exception):
    """Set on a call's future when its request's submit failed (``error``)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _submitted(
    sender: Sender,
    dispatcher: ReplyDispatcher,
    call_id: str,
    fut: asyncio.Future[protocol.Reply],
    submit: Submit,
    tried: asyncio.Future[Any],
) -> None:
    """A call's submit is done: note where the request went, or wake the call with the failure."""
    if tried.cancelled():
        return
    error = tried.exception()
    if error is not None:
        if not fut.done():
            fut.set_exception(_SubmitFailed(cast(Exception, error)))
        return
    entry_id = cast(bytes, tried.result())
    sender.note_entry(entry_id, submit.started)
    if not fut.done():  # else the call is over (answered, or given up and withdrawn by _give_up)
        dispatcher.placed(call_id, submit.placed.with_entry(entry_id))


def _give_up(
    sender: Sender,
    submit: Submit | None,
    sent: Placement | None,
    deadline: float,
    control: str | None,
    call_id: str,
) -> None:
    """Withdraw a request nobody waits for any more, now or once its submit tells where it went."""
    if submit is not None:
        if not submit.tried.done():
            later = functools.partial(
                sender.withdraw_late, submit.placed, deadline, control=control, call_id=call_id
            )
            submit.tried.add_done_callback(later)
            return
        sent = submit.placement()
    if sent is not None:
        sender.withdraw(sent, deadline, control, call_id=call_id)


def _expire(fut: asyncio.Future[protocol.Reply]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class _CallTimer:
    """One timer a call: shortly before the deadline it starts the check for live workers (so a
    timeout can say none is alive), at the deadline it expires the call."""

    __slots__ = ("handle",)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[protocol.Reply],
        deadline: float,
        margin: float,
        probe: Callable[[asyncio.Future[protocol.Reply] | None, str], None],
        service: str,
    ) -> None:
        self.handle = loop.call_at(deadline - margin, self._probe, loop, fut, deadline, probe, service)

    def _probe(
        self,
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[protocol.Reply],
        deadline: float,
        probe: Callable[[asyncio.Future[protocol.Reply] | None, str], None],
        service: str,
    ) -> None:
        probe(fut, service)
        self.handle = loop.call_at(deadline, _expire, fut)

    def cancel(self) -> None:
        self.handle.cancel()
