"""Proxies: a service's methods as attributes, ``await calc.add(1, 2)`` or ``async for x in db.export(0)``.

Calling a remote method returns a RemoteCall, which is both a coroutine (await
it for the result; anyio's ``start_soon`` and asyncio's ``create_task`` take it
too) and an async iterable (``async for`` over a streaming method's items).
Which one it is is decided when it is used, so a proxy works the same whether
or not it knew, when it was made, which methods stream. A proxy made with the
service class decodes each result (each streamed item) into the method's
return annotation; without it, results are plain data.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol, TypedDict, TypeVar, Unpack, cast

from .._config import check_seconds
from .._errors import BadResult, ConfigError, WireError
from .._service.definition import result_types
from .._wire.values import Mismatch
from .breaker import BreakerState, CircuitBreaker
from .jobs import DEFAULT_RESULT_TTL, Job

T = TypeVar("T")


class Caller(Protocol):
    """What a proxy needs of a client (``titan_broker.Client`` is one)."""

    @property
    def namespace(self) -> str: ...

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
    ) -> Any: ...

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
    ) -> AsyncGenerator[Any, None]: ...

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
    ) -> str: ...

    def job(self, job_id: str, decode: Callable[[Any], T] | None = None) -> Job[T]: ...


class ProxyOptions(TypedDict, total=False):
    """What ``with_options`` takes (see ``ServiceProxy.with_options``); None keeps the proxy's."""

    timeout: float | None
    key: str | None
    wait_for_worker: bool | None
    delay: float | None
    at: datetime | None
    deadline: float | None
    result_ttl: float | None


class ServiceProxy:
    """Calls the methods of a service by attribute: ``await proxy.add(1, 2)``.

    A proxy addresses the service, not one process: any live worker may answer.
    You do not make one yourself: ``ProcessManager.connect``, ``ProcessManager.spawn``,
    ``Pool.proxy`` and ``Client.proxy`` hand them out, typed as the service's class.
    """

    __slots__ = (
        "_breaker", "_class", "_client", "_key", "_methods", "_results", "_service", "_streaming", "_timeout",
        "_timing", "_wait",
    )  # fmt: skip

    def __init__(
        self,
        client: Caller,
        service: str,
        *,
        methods: frozenset[str] | None,
        timeout: float | None,
        key: str | None = None,
        breaker: CircuitBreaker | BreakerState | None = None,
        streaming: frozenset[str] = frozenset(),
        wait_for_worker: bool = True,
        cls: type | None = None,
        timing: CallTiming | None = None,
    ) -> None:
        self._client = client
        self._timing = timing or CallTiming()
        self._class = cls
        self._results = result_types(cls) if cls is not None else {}
        self._service = service
        self._methods = methods
        self._streaming = streaming
        self._timeout = timeout
        self._key = key
        self._wait = wait_for_worker
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
        return RemoteMethod(self, name)

    def with_options(self, **options: Unpack[ProxyOptions]) -> ServiceProxy:
        """A copy of this proxy whose calls use these options (None keeps this proxy's).

        ``timeout``: seconds each call may take, from start to finish.
        ``key``: calls with the same key go to the same worker while the pool
        does not change (for stateful services), and to any worker when that
        one is gone. ``wait_for_worker=False``: a call to a service with no
        live worker raises NoLiveWorkers at once, instead of waiting in the
        queue (up to its timeout) for a worker to start. ``delay`` (seconds)
        or ``at`` (a datetime): calls and jobs start no earlier. For jobs
        (``submit``): ``deadline``, seconds a job may take from its start
        (default none), and ``result_ttl``, seconds its outcome is kept.
        """
        timeout, key, wait = options.get("timeout"), options.get("key"), options.get("wait_for_worker")
        if timeout is not None:
            check_seconds("timeout", timeout)
        timing = self._timing.with_options(
            delay=options.get("delay"), at=options.get("at"), deadline=options.get("deadline"),
            result_ttl=options.get("result_ttl"),
        )  # fmt: skip
        return ServiceProxy(
            self._client,
            self._service,
            methods=self._methods,
            timeout=timeout if timeout is not None else self._timeout,
            key=key if key is not None else self._key,
            breaker=self._breaker,
            streaming=self._streaming,
            wait_for_worker=wait if wait is not None else self._wait,
            cls=self._class,
            timing=timing,
        )

    def _options(self) -> dict[str, Any]:
        return {"timeout": self._timeout, "key": self._key, "wait_for_worker": self._wait}

    def __repr__(self) -> str:
        return f"<ServiceProxy {self._service!r} in namespace {self._client.namespace!r}>"


class RemoteMethod:
    """One method of a service, as an attribute of its proxy; calling it gives a RemoteCall."""

    __slots__ = ("_method", "_proxy")

    def __init__(self, proxy: ServiceProxy, method: str) -> None:
        self._proxy = proxy
        self._method = method

    def __call__(self, *args: Any, **kwargs: Any) -> RemoteCall:
        return RemoteCall(self, args, kwargs)

    async def result(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call the method and return its result (what awaiting a RemoteCall does)."""
        p = self._proxy
        options = p._options()
        delay = p._timing.delay_now()
        if delay is not None:
            options["delay"] = delay
        breaker = p._breaker
        if breaker is None:
            result = await p._client.call(p._service, self._method, args, kwargs, **options)
            return self._decode(result, "result")
        breaker.before_call()
        try:
            result = await p._client.call(p._service, self._method, args, kwargs, **options)
        except BaseException as exc:
            breaker.after_call(exc)
            raise
        breaker.after_call(None)
        return self._decode(result, "result")

    async def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job[Any]:
        """Queue the call as a job with the proxy's options (delay or at, deadline, result_ttl, timeout),
        through its circuit breaker; the job's result is decoded as the proxy's class annotates it."""
        p = self._proxy
        breaker = p._breaker
        if breaker is not None:  # the submit, like a call, fails fast while the circuit is open
            breaker.before_call()
        try:
            job_id = await p._client.submit(
                p._service, self._method, args, kwargs, delay=p._timing.delay_now(),
                deadline=p._timing.deadline, result_ttl=p._timing.result_ttl or DEFAULT_RESULT_TTL,
                timeout=p._timeout,
            )  # fmt: skip
        except BaseException as exc:
            if breaker is not None:
                breaker.after_call(exc)
            raise
        if breaker is not None:
            breaker.after_call(None)
        return p._client.job(job_id, functools.partial(self._decode, what="result"))

    def _decode(self, value: Any, what: str) -> Any:
        """A result or item as the proxy's class annotates it (plain data without a class).

        The worker checked it against its own class; a mismatch here means the
        caller's class says otherwise (another version of the service).
        """
        returns = self._proxy._results.get(self._method)
        if returns is None:
            return value
        try:
            return returns.decode(value)
        except Mismatch as exc:
            shown = f"{what} of {self._proxy._service}.{self._method}()"
            message = exc.explain(shown, what, returns.shown, value)
            raise BadResult(WireError.BAD_RESULT, f"{message} (as the caller's class annotates it)") from None

    async def items(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """Iterate over the items of a streaming method (what iterating a RemoteCall does).

        For the circuit breaker, a stream left early (``break``, cancellation)
        after items came counts as a success (the service answered); left
        before any item, it counts as nothing, but a half-open probe is
        released so that the next call probes again.
        """
        p = self._proxy
        if p._timing.delay_now():
            raise ConfigError(
                f"{p._service}.{self._method}() streams: a delay applies to calls and jobs only"
            )
        breaker = p._breaker
        if breaker is not None:
            breaker.before_call()
        got_items = False
        try:
            stream = p._client.stream(p._service, self._method, args, kwargs, **p._options())
            async with contextlib.aclosing(stream):
                async for item in stream:
                    got_items = True
                    yield self._decode(item, "item")
        except BaseException as exc:  # GeneratorExit (break) and cancellation too
            if breaker is not None:
                breaker.after_call(None if got_items and not isinstance(exc, Exception) else exc)
            raise
        if breaker is not None:
            breaker.after_call(None)

    def __repr__(self) -> str:
        return f"<remote method {self._proxy._service}.{self._method}>"


class RemoteCall(Coroutine[Any, Any, Any]):
    """A call of a remote method: await it for its result, or ``async for`` over a streaming method's items.

    Nothing is sent until it is used. It is a real coroutine to asyncio and
    anyio (``create_task``, ``start_soon``, ``gather``); once awaited it
    cannot be iterated, and the other way round.
    """

    __slots__ = ("_args", "_coro", "_iterated", "_kwargs", "_method")

    def __init__(self, method: RemoteMethod, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._coro: Coroutine[Any, Any, Any] | None = None
        self._iterated = False

    def _started(self) -> Coroutine[Any, Any, Any]:
        if self._coro is None:
            if self._iterated:
                raise TypeError(f"{self!r} is being iterated with 'async for': it cannot be awaited too")
            self._coro = self._method.result(self._args, self._kwargs)
        return self._coro

    def __await__(self) -> Generator[Any, None, Any]:
        return self._started().__await__()

    def send(self, value: Any) -> Any:
        return self._started().send(value)

    def throw(self, *exc: Any) -> Any:
        return self._started().throw(*exc)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._coro is not None or self._iterated:
            raise TypeError(f"{self!r} was already used: call the method again")
        self._iterated = True
        return self._method.items(self._args, self._kwargs)

    def __repr__(self) -> str:
        return f"<call of {self._method._proxy._service}.{self._method._method}()>"


def with_options(proxy: T, **options: Unpack[ProxyOptions]) -> T:
    """``proxy.with_options(...)`` for typed code: the proxy's static type is the service class.

    Raises TypeError when ``proxy`` is not a titan-broker proxy.
    """
    if not isinstance(proxy, ServiceProxy):
        raise TypeError(f"with_options() takes a proxy from spawn/connect, not {type(proxy).__name__}")
    return cast(T, proxy.with_options(**options))


@dataclass(frozen=True)
class CallTiming:
    """When a proxy's calls and jobs start (a delay, or a time), and a job's deadline and result TTL."""

    delay: float | None = None
    at: datetime | None = None
    deadline: float | None = None
    result_ttl: float | None = None

    def with_options(
        self, *, delay: float | None, at: datetime | None, deadline: float | None, result_ttl: float | None
    ) -> CallTiming:
        """These options over this one's (None keeps this one's); raise ConfigError for a bad one."""
        if delay is not None and (delay != 0 or isinstance(delay, bool)):
            check_seconds("delay", delay)
        for name, value in (("deadline", deadline), ("result_ttl", result_ttl)):
            if value is not None:
                check_seconds(name, value)
        if at is not None:
            _check_aware(at)
            check_seconds("at (seconds from now)", max(0.001, at.timestamp() - time.time()))
        if delay is not None and at is not None:
            raise ConfigError("give delay (seconds) or at (a datetime), not both")
        if delay is not None or at is not None:
            return replace(self, delay=delay, at=at, deadline=deadline or self.deadline,
                           result_ttl=result_ttl or self.result_ttl)  # fmt: skip
        return replace(self, deadline=deadline or self.deadline, result_ttl=result_ttl or self.result_ttl)

    def delay_now(self) -> float | None:
        """Seconds from now to the start (``at`` is read now), None to start at once."""
        if self.at is not None:
            left = self.at.timestamp() - time.time()
            # A moment (all but) passed is no delay: the delay of a call is at least a millisecond.
            return left if left >= 0.001 else None
        return self.delay or None


def _check_aware(at: datetime) -> None:
    """Refuse a naive datetime: it names no time zone, so no reading of it is safe. Redis's clock
    and cron are UTC, but ``datetime.now()`` is local: either guess runs someone's job hours off."""
    if not isinstance(at, datetime):
        raise ConfigError(f"at must be a datetime, got {type(at).__name__} ({at!r})")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ConfigError(
            f"at must be an aware datetime (with a time zone), got the naive {at.isoformat()}: it could "
            "be UTC or local time; say which, as in datetime.now(UTC) + timedelta(minutes=5)"
        )
