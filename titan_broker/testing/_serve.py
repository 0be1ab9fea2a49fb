"""``serve()``: a service's workers in the test's own process, on its event loop, over a real Redis.

The workers are the same ``titan_worker.Worker`` that ``titan-worker run``
runs, started in a task group of the caller's (no subprocess), so calls go
through the whole protocol: the stream, the consumer group, the middleware,
the reply. What a test would otherwise sleep through (backoffs, delays,
schedules) or poke at by hand (dead letters, caches, rate limits) has a
helper on the ``Served`` object.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

import anyio
import anyio.abc

from .._calling.client import Client
from .._calling.proxy import RemoteMethod, ServiceProxy
from .._config import WorkerOptions, check_name
from .._errors import TitanError
from .._processes.policies import worker_options
from .._registry.dead_letters import DeadLetter, list_dead_letters
from .._service.definition import ServiceDefinition, describe, load_service_file
from .._wire.keys import Keys
from ._shared_redis import local_redis_url

if TYPE_CHECKING:
    from titan_worker import Worker

T = TypeVar("T")
U = TypeVar("U")

DEFAULT_TIMEOUT = 10.0
"""Seconds a helper (start-up, join, due_now, tick) waits at most unless told otherwise."""
POLL = 0.01
"""Seconds between two looks at a state held in Redis (join, due_now)."""

_open: list[Served[Any]] = []
"""The services being served in this process, for ``served(proxy)``."""


class Served(Generic[T]):
    """A service served in this process: ``async with`` starts its workers and gives a typed proxy.

    Made by ``serve()``; use it as an async context manager (the workers run
    until the block ends, then drain and run their ``@on_shutdown`` methods)
    and call its helpers inside the block, either through the object itself
    or through ``served(proxy)``.
    """

    def __init__(
        self,
        target: type[Any] | str | os.PathLike[str],
        cls: type[Any] | None,
        *,
        url: str | None,
        namespace: str | None,
        dependencies: Mapping[str, Any] | None,
        name: str | None,
        workers: int,
        concurrency: int | None,
        options: WorkerOptions | None,
        schedules: bool,
        timeout: float,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise TitanError(f"serve(workers={workers!r}): give a whole number of workers, 1 or more")
        self._target = target
        self._cls = cls
        self._url = url
        self.namespace = namespace or f"t{uuid.uuid4().hex[:12]}"
        """The namespace the service is served in (fresh unless given)."""
        self._dependencies = dict(dependencies or {})
        self._name = check_name(name, "service name") if name is not None else None
        self._count = workers
        # One shard unless the options say otherwise: sharding changes where calls wait, not what
        # they do, and a test's service needs no more than one slot.
        self._options = replace(worker_options(options, concurrency), shards=options.shards if options else 1)
        self._schedules = schedules
        self.timeout = timeout
        """Seconds start-up and each helper wait at most by default."""
        self.definition: ServiceDefinition | None = None
        self.workers: list[Worker] = []
        """The in-process workers (``titan_worker.Worker``), once started."""
        self._client: Client | None = None
        self._proxy: Any = None
        self._tg: anyio.abc.TaskGroup | None = None

    # -- what the block sees ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The Redis the service is served on."""
        if self._url is None:
            raise TitanError(f"{self._shown()} is not started: use 'async with serve(...) as proxy'")
        return self._url

    @property
    def service(self) -> str:
        """The service's name (its @process name, or ``name=``)."""
        return self._name or self._started_definition().name

    @property
    def client(self) -> Client:
        """A connected Client in the service's namespace (closed when the block ends)."""
        if self._client is None:
            raise TitanError(f"{self._shown()} is not started: use 'async with serve(...) as proxy'")
        return self._client

    @overload
    def proxy(self, service: str, cls: type[U]) -> U: ...
    @overload
    def proxy(self, service: str, cls: None = ...) -> ServiceProxy: ...
    def proxy(self, service: str, cls: type[Any] | None = None) -> Any:
        """A proxy for another service in the same namespace (typed as ``cls``), through ``client``."""
        check_name(service, "service name")
        return self.client.proxy(service, cls)

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> T:
        if self._client is not None:
            raise TitanError(f"{self._shown()} is already started: each serve() is entered once")
        from titan_worker import Worker  # the worker runtime, imported only by those who serve

        definition = self._load()
        self.definition = definition
        service = self._name or definition.name
        if self._url is None:
            self._url = await anyio.to_thread.run_sync(local_redis_url)
        url = self._url
        client = Client(url, namespace=self.namespace, default_timeout=max(self.timeout, 30.0))
        self.workers = [
            Worker(
                definition, url=url, namespace=self.namespace, options=self._options,
                dependencies=self._dependencies, service_name=service,
            )
            for _ in range(self._count)
        ]  # fmt: skip
        for worker in self.workers:
            worker.scheduler.ticking = self._schedules
        await client.__aenter__()  # first in, last out: its task group encloses the workers' one
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            with anyio.fail_after(self.timeout):
                async with anyio.create_task_group() as starting:
                    for worker in self.workers:
                        starting.start_soon(tg.start, worker.run)
        except BaseException as exc:
            for worker in self.workers:
                worker.stop()
            tg.cancel_scope.cancel()
            try:
                await tg.__aexit__(None, None, None)
            finally:
                await client.aclose()
            if isinstance(exc, TimeoutError):
                raise TitanError(
                    f"{self._shown()}: {self._count} worker(s) of {service!r} not ready within "
                    f"{self.timeout:g} s (Redis at {client.url})"
                ) from exc
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # the one worker's start-up error, as `titan-worker run` says it
            raise exc
        self._client, self._tg = client, tg
        streaming = frozenset(spec.name for spec in definition.methods.values() if spec.streaming)
        self._proxy = client.proxy(service, self._cls or definition.cls, streaming=streaming)
        _open.append(self)
        return cast(T, self._proxy)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, tg = self._client, self._tg
        self._client = self._tg = None
        if self in _open:
            _open.remove(self)
        if tg is None or client is None:
            return
        try:
            for worker in self.workers:
                worker.stop()
            # The drain is bounded by the grace period; past it (and a margin), the workers are cancelled.
            tg.cancel_scope.deadline = anyio.current_time() + self._options.grace_period + 5.0
            await tg.__aexit__(None, None, None)
        finally:
            await client.aclose()  # not under a scope of ours: it leaves the client's task group

    # -- helpers ---------------------------------------------------------------------------------

    async def join(self, timeout: float | None = None, *, due_now: bool = False) -> None:
        """Wait until the service has nothing left to do: its queue, its workers' own queues and its
        delayed set are empty and no call runs (Dramatiq's ``join``).

        With ``due_now``, delayed calls (delays, jobs, @retry's next runs) are made due as they
        come, so a chain of retries runs through without its backoffs. Raises TitanError, saying
        what is left, after ``timeout`` seconds (default: the serve's ``timeout``).
        """
        timeout = self.timeout if timeout is None else timeout
        left: str | None = "not looked at yet"
        with anyio.move_on_after(timeout):
            while True:
                if due_now:
                    for scope in self._scopes():
                        await self._make_due(self.client.keys.delayed(scope))
                left = await self._left()
                if not left:
                    return
                await anyio.sleep(POLL)
        raise TitanError(f"{self._shown()}.join(): still {left} after {timeout:g} s")

    async def due_now(self, *, at_least: int = 0, timeout: float | None = None) -> int:
        """Make every delayed call of the service due now (delays, jobs submitted with a delay, and
        @retry's next runs), and wait until the workers have moved them onto the queue.

        ``at_least``: first wait until that many calls are delayed (a retry is delayed only once
        its run failed). Returns how many calls were made due. Raises TitanError after
        ``timeout`` seconds (default: the serve's ``timeout``).
        """
        timeout = self.timeout if timeout is None else timeout
        redis = self.client.redis
        delayed = [self.client.keys.delayed(scope) for scope in self._scopes()]
        made: dict[str, set[bytes]] = {}
        waiting = 0
        with anyio.move_on_after(timeout):
            while (waiting := sum([int(await redis.zcard(key)) for key in delayed])) < at_least:  # noqa: ASYNC110 - in Redis
                await anyio.sleep(POLL)
            made = {key: await self._make_due(key) for key in delayed}
            for key, members in made.items():
                while members and await _any_member(redis, key, members):  # noqa: ASYNC110 - in Redis
                    await anyio.sleep(POLL)
            return sum(len(members) for members in made.values())
        if waiting < at_least:
            raise TitanError(
                f"{self._shown()}.due_now(at_least={at_least}): {waiting} delayed call(s) of "
                f"{self.service!r} after {timeout:g} s"
            )
        raise TitanError(
            f"{self._shown()}.due_now(): {sum(len(m) for m in made.values())} call(s) made due but not "
            "moved onto the queue "
            f"within {timeout:g} s (are the workers running?)"
        )

    async def tick(self, method: str | Any, *, timeout: float | None = None) -> Any:
        """Run a @periodic method now, as a tick would (a job through the queue), and return its result.

        ``method``: its name, or the proxy's method (``served.tick(shop.refresh)``). Raises
        TitanError when the method is not @periodic, and what the run raised (RemoteError...)
        when it fails; waits at most ``timeout`` seconds (default: the serve's ``timeout``).
        """
        name = method._method if isinstance(method, RemoteMethod) else method
        definition = self._started_definition()
        spec = definition.methods.get(name) if isinstance(name, str) else None
        if spec is None or spec.periodic is None:
            periodic = sorted(s.name for s in definition.methods.values() if s.periodic is not None)
            raise TitanError(
                f"{self._shown()}.tick({name!r}): {definition.cls.__qualname__} has no @periodic method of "
                f"that name (its @periodic methods: {', '.join(periodic) or 'none'})"
            )
        timeout = self.timeout if timeout is None else timeout
        remote = getattr(self._proxy, spec.name)
        job_id = await self.client.submit(self.service, spec.name, timeout=timeout)
        job = self.client.job(job_id, functools.partial(remote._decode, what="result"))
        return await job.result(timeout)

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The service's dead letters, oldest first (at most ``count``)."""
        return await list_dead_letters(self.client.redis, self.client.keys, self.service, count=count)

    async def clear_caches(self) -> list[str]:
        """Drop every cached result of the service's @cache methods, in every worker; return their names."""
        names = [s.name for s in self._started_definition().methods.values() if s.cache is not None]
        for name in names:
            await self.client.invalidate_cache(self.service, name)
        return names

    async def reset_rate_limits(self) -> list[str]:
        """Fill every @rate_limit bucket of the service again (service scope in Redis, worker scope in
        the workers served here, per key too); return the methods' names."""
        names = [s.name for s in self._started_definition().methods.values() if s.rate_limit is not None]
        redis, keys = self.client.redis, self.client.keys
        for name in names:
            bucket = keys.rate(self.service, name)
            found = [bucket] + [key async for key in redis.scan_iter(match=_glob(bucket) + ":*")]
            for key in found:  # one by one: on a cluster, one DEL may not span nodes
                await redis.delete(key)
        for worker in self.workers:
            worker.forget_local_state()
        return names

    # -- inside ----------------------------------------------------------------------------------

    def _shown(self) -> str:
        target = self._target
        return f"serve({target.__qualname__ if isinstance(target, type) else os.fspath(target)!r})"

    def _started_definition(self) -> ServiceDefinition:
        if self.definition is None or self._client is None:
            raise TitanError(f"{self._shown()} is not started: use 'async with serve(...) as proxy'")
        return self.definition

    def _load(self) -> ServiceDefinition:
        target = self._target
        if isinstance(target, type):
            return describe(target)
        return load_service_file(os.fspath(target))

    def _scopes(self) -> list[str]:
        """The scope of each shard the workers read (the service's own only, unless sharded)."""
        return self.workers[0].ctx.scopes if self.workers else [self.service]

    async def _make_due(self, delayed: str) -> set[bytes]:
        """Rescore every call of one delayed set to Redis's now; wake a worker. Returns them."""
        redis, keys = self.client.redis, self.client.keys
        scope = Keys.scope_of(delayed)
        members = cast(list[bytes], await redis.zrange(delayed, 0, -1))
        if not members:
            return set()
        seconds, micros = await redis.time()
        now_ms = seconds * 1000 + micros // 1000
        await redis.zadd(delayed, dict.fromkeys(members, now_ms), xx=True)  # moved meanwhile: left alone
        await redis.lpush(keys.delayed_wake(scope), b"1")  # the worker that pops it looks at once
        await redis.ltrim(keys.delayed_wake(scope), 0, 0)
        await redis.pexpire(keys.delayed_wake(scope), 1000)
        return set(members)

    async def _left(self) -> str | None:
        """What the service still has to do, in words, or None when nothing."""
        keys = self.client.keys
        running = sum(worker.in_flight for worker in self.workers)
        queued, delayed, first = 0, 0, None
        for scope in self._scopes():
            streams = [keys.calls(scope)] + [keys.worker_calls(scope, w.worker_id) for w in self.workers]
            for user in self.workers[0].ctx.users if self.workers else ():  # registered callers' streams
                streams += [keys.user_calls(scope, user)]
                streams += [keys.user_worker_calls(scope, w.worker_id, user) for w in self.workers]
            # One transaction per shard (all its keys in one slot): a retry leaves the queue for the
            # delayed set, and a due call the other way, in one step; read apart, both could look empty.
            async with self.client.redis.pipeline(transaction=True) as pipe:
                for stream in streams:
                    pipe.xlen(stream)
                pipe.zrange(keys.delayed(scope), 0, 0, withscores=True)
                pipe.zcard(keys.delayed(scope))
                replies = await pipe.execute()
            queued += sum(int(n) for n in replies[: len(streams)])
            delayed += int(replies[-1])
            if replies[-2] and (first is None or float(replies[-2][0][1]) < float(first[0][1])):
                first = replies[-2]
        parts = []
        if queued:
            parts.append(f"{queued} call(s) queued or running")
        if running and not queued:
            parts.append(f"{running} call(s) running")
        if delayed:
            due_in = (float(first[0][1]) - time.time() * 1000) / 1000 if first else 0.0
            parts.append(
                f"{delayed} delayed call(s) (the next due in {max(due_in, 0.0):.1f} s: "
                "due_now() runs them now)"
            )
        return " and ".join(parts) or None


async def _any_member(redis: Any, key: str, members: set[bytes]) -> bool:
    """Whether any of ``members`` is still in the sorted set ``key``."""
    scores = await redis.zmscore(key, list(members))
    return any(score is not None for score in scores)


def _glob(key: str) -> str:
    """``key`` as a SCAN pattern matching itself only (glob characters escaped)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in key)


@overload
def serve(
    target: type[T],
    cls: None = ...,
    *,
    url: str | None = ...,
    namespace: str | None = ...,
    dependencies: Mapping[str, Any] | None = ...,
    name: str | None = ...,
    workers: int = ...,
    concurrency: int | None = ...,
    options: WorkerOptions | None = ...,
    schedules: bool = ...,
    timeout: float = ...,
) -> Served[T]: ...
@overload
def serve(
    target: str | os.PathLike[str],
    cls: type[T],
    *,
    url: str | None = ...,
    namespace: str | None = ...,
    dependencies: Mapping[str, Any] | None = ...,
    name: str | None = ...,
    workers: int = ...,
    concurrency: int | None = ...,
    options: WorkerOptions | None = ...,
    schedules: bool = ...,
    timeout: float = ...,
) -> Served[T]: ...
@overload
def serve(
    target: str | os.PathLike[str],
    cls: None = ...,
    *,
    url: str | None = ...,
    namespace: str | None = ...,
    dependencies: Mapping[str, Any] | None = ...,
    name: str | None = ...,
    workers: int = ...,
    concurrency: int | None = ...,
    options: WorkerOptions | None = ...,
    schedules: bool = ...,
    timeout: float = ...,
) -> Served[ServiceProxy]: ...
def serve(
    target: type[Any] | str | os.PathLike[str],
    cls: type[Any] | None = None,
    *,
    url: str | None = None,
    namespace: str | None = None,
    dependencies: Mapping[str, Any] | None = None,
    name: str | None = None,
    workers: int = 1,
    concurrency: int | None = None,
    options: WorkerOptions | None = None,
    schedules: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Served[Any]:
    """Serve a service in this process: ``async with serve(Shop) as shop: await shop.price(10)``.

    ``target`` is the @process class or the path of its file (then ``cls``
    types the proxy). Its workers (``workers`` of them, each with
    ``concurrency`` slots and ``options``) run on the caller's event loop, no
    subprocess, speaking the real protocol to a real Redis: ``url``, else
    ``$TITAN_TEST_REDIS_URL``, else a private redis-server started once per
    process (``local_redis_url``). Each serve has a fresh namespace unless
    ``namespace`` is given (give two services the same one to let them call
    each other). ``dependencies`` reach ``init()`` as they are, not through
    JSON, so a proxy or a Client can be one. ``name`` serves the class under
    another service name. ``schedules=False``: @periodic methods run only
    through ``tick()``. ``timeout`` bounds the start-up and, by default, each
    helper. Remote errors, deadlines, decorators, streaming, jobs, health
    checks and ``@on_shutdown`` behave as with ``titan-worker run``.
    """
    if cls is not None and isinstance(target, type):
        raise TitanError(
            f"serve({target.__qualname__}, {cls.__qualname__}): give a class, or a path and a class"
        )
    return Served(
        target, cls, url=url, namespace=namespace, dependencies=dependencies, name=name, workers=workers,
        concurrency=concurrency, options=options, schedules=schedules, timeout=timeout,
    )  # fmt: skip


def served(proxy: Any) -> Served[Any]:
    """The ``Served`` behind a proxy that ``serve()`` gave (or one made from it by ``with_options``):
    ``await served(shop).join()``. Raises TitanError for any other proxy, or once its block ended."""
    if isinstance(proxy, ServiceProxy):
        for candidate in _open:
            if candidate._client is proxy._client and proxy._service == candidate.service:
                return candidate
    raise TitanError(f"{proxy!r} was not given by a serve() that is still open")
