"""Putting requests into Redis, and taking back the ones nobody waits for any more.

``Sender.send`` queues a request through the submit script within the call's
deadline. The script also checks that deadline in Redis's clock (this module
keeps an estimate of the offset between Redis's clock and the local one), so
a request that reaches Redis after its caller gave up is refused rather than
run later. ``Sender.withdraw`` deletes a request given up (and stops its
stream) in the background, retrying while Redis is away, without delaying
the caller's error.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import anyio
import anyio.abc
from redis import exceptions as rexc

from .._errors import BacklogFull, RedisOutOfMemory, RedisUnavailable, TitanError
from .._redis.backoff import Backoff
from .._redis.connection import REDIS_ERRORS, AutoPipeline, Redis, titan_error
from .._redis.scripting import Batch, Script
from .._wire import protocol
from .._wire.keys import Keys, scope_service
from .jobs import cancel
from .replies import Placement

logger = logging.getLogger(__name__)

_SUBMIT = Batch("submit_many")
"""Calls sent together share one script call (submit.lua's check and XADD, per call)."""
_ENQUEUE = Script("enqueue")
DEADLINE_SLACK_MS = 10
"""Added to the deadline the submit script checks (Redis's clock, estimated): rounding of ids."""
FORGET_GRACE = 5.0
"""Seconds past a call's deadline that deleting it is retried (then workers drop it as late anyway)."""
CONTROL_TTL_MS = 600_000
GONE_TTL_MS = 600_000
"""How long the mark of a call given up lasts (ms): a delayed or retried run due later than that is
not stopped by it (the worker still drops it once the call's deadline has passed)."""
"""A streaming call's control hash (credit, cancel) expires this long after its last write."""

_Withdrawal = tuple[Placement, str | None, str | None]
"""A request given up: where it is, its stream's control hash, its call id (to leave the gone mark)."""


class _Late(Exception):
    """The call's deadline passed while its submit was in flight."""


async def _within(fut: asyncio.Future[Any], deadline: float) -> Any:
    """The future's result, waited for until ``deadline`` (event-loop time) at most; raises _Late.

    A caller cancelled while it waits does not cancel the future.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    def late() -> None:
        if not waiter.done():
            waiter.set_exception(_Late())

    fut.add_done_callback(wake)
    timer = loop.call_at(deadline, late)
    try:
        await waiter
    finally:
        timer.cancel()
        fut.remove_done_callback(wake)
    return fut.result()


async def out_of_memory(redis: Redis, doing: str, deadline: float) -> RedisOutOfMemory:
    """The error for a write refused at maxmemory, with the limit when INFO tells it (by ``deadline``)."""
    detail = ""
    with anyio.move_on_after(max(0.0, min(0.5, deadline - anyio.current_time()))):
        try:
            info = await redis.info("memory")
            detail = (
                f": it uses {info.get('used_memory')} bytes and its limit is maxmemory "
                f"{info.get('maxmemory')} bytes (maxmemory-policy {info.get('maxmemory_policy')})"
            )
        except REDIS_ERRORS:
            pass
    return RedisOutOfMemory(
        f"cannot {doing}: Redis is out of memory{detail}, so it refuses new writes; "
        "free memory in Redis, raise maxmemory, or let workers drain the queues"
    )


async def redis_error(redis: Redis, exc: Exception, doing: str, deadline: float) -> TitanError:
    """The TitanError for a redis-py error (out of memory with its limit)."""
    if isinstance(exc, rexc.OutOfMemoryError):
        return await out_of_memory(redis, doing, deadline)
    return titan_error(exc, doing)


class DelayOrJob(NamedTuple):
    """How a request that is not an ordinary call goes out: after a delay, or as a job, or both."""

    delay_ms: int = 0
    job_id: str | None = None
    """The job's id (``<service>:<token>``); its token is the request's field ``j``."""
    result_ttl_ms: int = 86_400_000


def unanswered(doing: str, timeout: float, job: bool = False) -> RedisUnavailable:
    """The error for a submit Redis did not answer by the call's deadline."""
    outcome = (
        "if the job reached Redis after all, it is cancelled unless a worker had started it"
        if job
        else "the request was not queued"
    )
    return RedisUnavailable(
        f"cannot {doing}: Redis did not answer within the timeout of {timeout:g} s "
        f"(it is stopped, overloaded or unreachable); {outcome}"
    )


class Submit(NamedTuple):
    """An ordinary call's request on its way (``Sender.submit``)."""

    tried: asyncio.Future[Any]
    """Gets the entry id, or the error."""
    placed: Placement
    """Where it goes (its entry id not yet known)."""
    started: float
    """Event-loop time it was queued (for the clock offset)."""
    key: str
    """The first key it writes (named in an error)."""

    def placement(self) -> Placement | None:
        """Where it went, once ``tried`` is done; None when it failed."""
        tried = self.tried
        if tried.cancelled() or tried.exception() is not None:
            return None
        return self.placed.with_entry(cast(bytes, tried.result()))


class Sender:
    """Sends requests over one auto-pipelined channel; withdraws those given up."""

    def __init__(self, keys: Keys, max_backlog: int, pipe: AutoPipeline, redis: Callable[[], Redis]) -> None:
        self.keys = keys
        self.max_backlog = max_backlog
        self.pipe = pipe
        self._redis = redis
        self.offset_ms = 0.0
        """Redis's clock minus the event loop's, in ms: an upper bound, from the last entry id."""
        self.tg: anyio.abc.TaskGroup | None = None
        """Where withdrawals run; None while the client closes (they wait for ``withdraw_pending``)."""
        self._withdrawals: dict[int, _Withdrawal] = {}
        self._withdrawal_ids = itertools.count()
        self.user_of: Callable[[str], str | None] = lambda service: None
        """service -> the client's ACL user when it is registered for the service, else None."""

    def calls(self, scope: str) -> str:
        """The request stream for this client's calls to a shard's scope: its user's own when the user
        is registered for the service, else the shared one."""
        user = self.user_of(scope_service(scope))
        return self.keys.calls(scope) if user is None else self.keys.user_calls(scope, user)

    async def send(
        self,
        service: str,
        method: str,
        fields: dict[bytes, bytes],
        worker: str | None,
        deadline: float,
        timeout: float,
        later: DelayOrJob | None = None,
    ) -> Placement:
        """Queue a request by ``deadline`` (event loop time); return where it went. ``service``: the
        service, or the scope of the shard the request goes to.

        The request is sent whatever happens to its caller: cancelled, or past
        the deadline, the caller stops waiting, and a request that still
        reaches Redis is withdrawn once its id is known. ``later``: into the
        delayed set and/or as a job (enqueue.lua). Raises BacklogFull,
        RedisOutOfMemory, RedisUnavailable (also when Redis does not answer by
        the deadline).
        """
        doing = f"send {scope_service(service)}.{method}()"
        shared = self.calls(service)
        flat = protocol.flat_fields(fields)
        keys, argv, placed = self._call_parts(service, worker)
        member = b""
        if later is not None:
            keys = [shared, self.keys.delayed(service)]
            argv = [self.keys.config(service), self.max_backlog]
            user = self.user_of(scope_service(service))
            if later.delay_ms > 0:  # a registered user's call comes due on the user's stream
                routed = fields if user is None else {**fields, protocol.F_USER: user.encode()}
                member = protocol.pack_fields(routed)
            job = protocol.job_token(fields)
            job_key = None
            if later.job_id is not None and job is not None:
                job_key = self.keys.job(service, job)
                keys += [job_key, self.keys.jobs(service)]
            # Where it waits (to withdraw it): the delayed set or the stream, and its job's hash.
            delayed = later.delay_ms > 0
            streams = (self.keys.delayed(service) if delayed else shared,)
            placed = Placement(streams, b"", delayed, job_key)
        script = "EVALSHA submit_many" if later is None else "EVALSHA enqueue"  # named in an AccessDenied
        loop = asyncio.get_running_loop()
        for _attempt in range(3):  # a NOSCRIPT or a TITANLATE with time left is tried again
            not_after = int(deadline * 1000 + self.offset_ms) + DEADLINE_SLACK_MS
            entry_id: bytes | None = None
            started = loop.time()
            # The auto-pipeline's own task sends the request: the caller's cancellation or its
            # deadline ends only the wait (far cheaper than a shielded cancel scope), and a
            # request that still reaches Redis is deleted once its id is known.
            if later is None:
                fut = _SUBMIT.part(self.pipe, keys, [*argv, not_after, *flat])
            else:
                extra = [later.delay_ms, member, later.job_id or "", later.result_ttl_ms, method]
                fut = self.pipe.submit(*_ENQUEUE.command(keys, [*argv, not_after, *extra, *flat]))
            try:
                entry_id = cast(bytes, await _within(fut, deadline))
            except _Late:
                fut.add_done_callback(functools.partial(self.withdraw_late, placed, deadline))
            except asyncio.CancelledError:
                fut.add_done_callback(functools.partial(self.withdraw_late, placed, deadline))
                raise
            except Exception as exc:
                await self.refused(exc, service, method, script, keys[0], deadline)
                if loop.time() < deadline:
                    continue
            if entry_id == b"delayed":
                return placed.with_entry(member)
            if entry_id is not None:
                self.note_entry(entry_id, started)
                return placed.with_entry(entry_id)
            raise unanswered(doing, timeout, later is not None and later.job_id is not None)
        raise RedisUnavailable(f"cannot {doing}: Redis's clock disagrees with the call's deadline")

    async def refused(
        self, exc: Exception, service: str, method: str, script: str, key: str, deadline: float
    ) -> None:
        """Raise the error for a submit that failed with ``exc``; return when it is to be sent again
        (the script was unknown, or Redis's clock said the deadline had passed with time left here)."""
        doing = f"send {scope_service(service)}.{method}()"
        if isinstance(exc, rexc.NoScriptError):  # Redis restarted, or SCRIPT FLUSH: load it, send again
            await _ENQUEUE.load(self.pipe)
            return
        if isinstance(exc, rexc.OutOfMemoryError):
            raise await out_of_memory(self._redis(), doing, deadline) from None
        if isinstance(exc, rexc.ResponseError):
            message = str(exc)
            if message.startswith("TITANBACKLOG"):
                limit = message.split()[-1]
                raise BacklogFull(
                    f"service {scope_service(service)!r} refused {method}(): its backlog is full "
                    f"({limit} calls waiting, max_backlog={limit}); add workers or retry later"
                ) from None
            if not message.startswith("TITANLATE"):
                raise titan_error(exc, doing, command=script, key=key) from exc
            if asyncio.get_running_loop().time() < deadline:
                await self.sync_clock()  # TITANLATE with time left: Redis's clock jumped; measure it again
            return
        if isinstance(exc, REDIS_ERRORS):
            raise titan_error(exc, doing, command=script, key=key) from exc
        if isinstance(exc, RedisUnavailable):  # the batch this send shared was cut off
            raise RedisUnavailable(f"cannot {doing}: {exc or 'the connection was lost'}") from exc
        raise exc

    def submit(
        self, service: str, fields: dict[bytes, bytes], worker: str | None, deadline: float, now: float
    ) -> Submit:
        """Send an ordinary call's request without waiting for Redis's answer (the first try ``send``
        makes): its caller waits for the reply at once, and looks at the try only when it failed.
        ``now``: the event loop's time, read by the caller at most this long ago."""
        keys, argv, placed = self._call_parts(service, worker)
        not_after = int(deadline * 1000 + self.offset_ms) + DEADLINE_SLACK_MS
        started = now
        tried = _SUBMIT.part(self.pipe, keys, [*argv, not_after, *protocol.flat_fields(fields)])
        return Submit(tried, placed, started, keys[0])

    def _call_parts(self, service: str, worker: str | None) -> tuple[list[str], list[Any], Placement]:
        """An ordinary call's keys and arguments for submit.lua, and where it goes."""
        shared = self.calls(service)
        if worker is None:
            return [shared], [self.keys.config(service), "", self.max_backlog], Placement((shared,), b"")
        user = self.user_of(scope_service(service))
        own = self.keys.worker_calls(service, worker)
        streams = (own if user is None else self.keys.user_worker_calls(service, worker, user), shared)
        argv = [self.keys.config(service), self.keys.worker(service, worker), self.max_backlog]
        return list(streams), argv, Placement(streams, b"")

    def note_entry(self, entry_id: bytes, started: float) -> None:
        """A request sent at loop time ``started`` got ``entry_id``, stamped by Redis's clock: the
        offset between the two clocks is at most this (an upper bound, kept for the next deadline)."""
        self.offset_ms = protocol.entry_time_ms(entry_id) + 1 - started * 1000

    async def sync_clock(self) -> None:
        """Measure the offset between Redis's clock and the event loop's (an upper bound)."""
        started = asyncio.get_running_loop().time()
        seconds, micros = await self.pipe.execute("TIME")
        self.offset_ms = int(seconds) * 1000 + int(micros) / 1000 + 1 - started * 1000

    def withdraw_late(
        self,
        placed: Placement,
        deadline: float,
        fut: asyncio.Future[Any],
        *,
        control: str | None = None,
        call_id: str | None = None,
    ) -> None:
        """A submit nobody waits for ended: if it queued the request after all, delete it."""
        if fut.cancelled() or fut.exception() is not None:
            return
        self.withdraw(placed.with_entry(cast(bytes, fut.result())), deadline, control, call_id)

    def withdraw(
        self, sent: Placement, deadline: float, control: str | None = None, call_id: str | None = None
    ) -> None:
        """Delete a request nobody waits for, in the background; with ``control``, stop its stream too.

        Deleting it is harmless when a worker has taken it already (its reply
        is dropped); when none has, no worker ever runs it. With ``call_id`` a
        mark says the caller gave up, so that no later run of the call is
        queued (a delayed call that comes due, a @retry).
        """
        withdrawal_id = next(self._withdrawal_ids)
        self._withdrawals[withdrawal_id] = (sent, control, call_id)
        if self.tg is not None:
            self.tg.start_soon(self._withdraw, withdrawal_id, deadline)

    async def _withdraw(self, withdrawal_id: int, deadline: float) -> None:
        """Retry until done, or until the request is so late that workers drop it unrun.

        Cancelled (the client closes), the job stays for ``withdraw_pending``.
        """
        backoff = Backoff(0.05, 1.0)
        while True:
            with anyio.move_on_after(2.0):
                try:
                    withdrawal = self._withdrawals.get(withdrawal_id)
                    if withdrawal is not None:
                        await self._delete(*withdrawal)
                    self._withdrawals.pop(withdrawal_id, None)
                    return
                except REDIS_ERRORS as exc:
                    logger.debug("cannot delete a request given up yet (%s)", exc)
            if anyio.current_time() > deadline + FORGET_GRACE:
                self._withdrawals.pop(withdrawal_id, None)
                return
            await backoff.sleep()

    async def withdraw_pending(self) -> None:
        """Withdraw every request still waiting to be (the client closes); raises redis-py errors."""
        withdrawals, self._withdrawals = self._withdrawals, {}
        for withdrawal in withdrawals.values():
            await self._delete(*withdrawal)

    async def _delete(self, placement: Placement, control: str | None, call_id: str | None) -> None:
        streams, entry_id = placement.streams, placement.entry_id
        if placement.job is not None:  # a job whose submit was given up: cancelled, unless a worker has it
            await cancel(self._redis(), self.keys, Keys.service_of(placement.job), placement.job)
            return
        async with self._redis().pipeline(transaction=True) as pipe:  # never a control hash without TTL
            for key in streams:
                if placement.delayed:
                    pipe.zrem(key, entry_id)  # the request is the member
                else:
                    pipe.xdel(key, entry_id)
            if control is not None:
                pipe.hset(control, "cancel", 1)
                pipe.pexpire(control, CONTROL_TTL_MS)
            if call_id is not None:
                pipe.set(self.keys.gone(Keys.scope_of(streams[0]), call_id), 1, px=GONE_TTL_MS)
            await pipe.execute()

    async def grant(self, control: str, wake: str, credit: int, deadline: float) -> None:
        """Let a streaming call's worker send items up to ``credit`` (by ``deadline``), and wake it
        if it waits for credit (the wake list holds only the latest credit)."""
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            try:
                async with self._redis().pipeline(transaction=True) as pipe:
                    pipe.hset(control, "credit", credit)
                    pipe.pexpire(control, CONTROL_TTL_MS)
                    pipe.delete(wake)
                    pipe.rpush(wake, credit)
                    pipe.pexpire(wake, CONTROL_TTL_MS)
                    await pipe.execute()
            except REDIS_ERRORS as exc:
                raise await redis_error(self._redis(), exc, "grant a stream more items", deadline) from exc
