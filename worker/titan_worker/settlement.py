"""Settling a call: write its answer and acknowledge its entry, or dead-letter it.

Each is one script that first checks that this worker still owns the entry:
a worker cut off from Redis long enough for its calls to be taken over
writes nothing for them when it comes back, so a caller never gets a second
answer. A settle that Redis cannot take yet (unreachable, or out of memory)
is retried, with backoff, for up to ``SETTLE_PATIENCE`` past the call's
deadline; the entry stays this worker's meanwhile (its heartbeat renews it),
so the call is answered once Redis is back and runs once. The condition is
logged when it starts and ends, not once per call or per try.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as rexc

from titan_broker._errors import RedisUnavailable, WireError
from titan_broker._redis import CONNECTION_ERRORS, Backoff, Batch, Script
from titan_broker._wire import GROUP, Keys, acl, protocol

from .call import DeadLetter, Entry, HandedOff, Outcome, Reply, Retry
from .context import WorkerContext

_FINISH = Batch("finish")
_DEAD_LETTER = Script("dead_letter")
_RETRY = Script("retry")
_RETRYABLE: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, RedisUnavailable, rexc.ResponseError)
_SETTLE_TROUBLE = ("settle-oom", "settle-unreachable")
_NO_BACKOFF = Backoff()
"""Never slept on: a settle's own backoff is made at its first failure."""
SETTLE_PATIENCE = 30.0
"""Seconds past a call's deadline that its worker keeps trying to settle it."""


def _out_of_memory(exc: Exception) -> bool:
    return isinstance(exc, rexc.OutOfMemoryError) or str(exc).startswith("OOM")


class Settlement:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    async def settle(self, entry: Entry, outcome: Outcome) -> None:
        """Write the outcome of an entry this worker ran, and acknowledge the entry."""
        match outcome:
            case HandedOff():
                return
            case DeadLetter(reason=reason, deadline_ms=deadline_ms, deliveries=deliveries):
                await self.dead_letter(entry, reason, deliveries, deadline_ms)
            case Retry(failure=failure):
                await self._retrying(entry, failure.deadline_ms, self._retry, entry, outcome)
            case Reply():
                await self._answer(entry, outcome)

    def answer_soon(self, entry: Entry, outcome: Reply) -> Settling:
        """Send a reply's answer and acknowledgement (one try, in the script call other settles share)
        without waiting for it: whoever holds the entry waits on the try and, when it did not settle
        the call, on ``Settling.finish``, which ends it as ``settle`` would have."""
        return Settling(self, entry, outcome, self._finish_part(entry, outcome))

    async def _answer(self, entry: Entry, outcome: Reply, first: asyncio.Future[Any] | None = None) -> None:
        deadline_ms = outcome.deadline_ms
        try:
            await self._retrying(entry, deadline_ms, self._finish, entry, outcome, first=first)
        except rexc.ResponseError as exc:
            # The reply key cannot take a reply (a key of another type, say): keep the call.
            reason = f"its reply could not be written: {protocol.excerpt(str(exc), 200)}"
            await self.dead_letter(entry, reason, 1, deadline_ms, answer=False)

    async def dead_letter(
        self, entry: Entry, reason: str, deliveries: int, deadline_ms: int | None, *, answer: bool = True
    ) -> None:
        """Move an entry to the dead letters and, when it has a reply key, tell its caller."""
        ctx = self.ctx
        ctx.log.log(logging.ERROR, "dead-letter", "worker %s: dead-lettered %s: %s",
                    ctx.worker_id, entry.id.decode(), reason)  # fmt: skip
        try:
            await self._retrying(entry, deadline_ms, self._dead_letter, entry, reason, deliveries, answer)
        except rexc.ResponseError:
            if not answer:
                raise
            # The caller's reply key cannot take the reply: keep the dead letter anyway.
            await self._retrying(entry, deadline_ms, self._dead_letter, entry, reason, deliveries, False)

    async def _retrying(
        self,
        entry: Entry,
        deadline_ms: int | None,
        step: Callable[..., Awaitable[int]],
        *args: Any,
        first: asyncio.Future[Any] | None = None,
    ) -> None:
        """Run a settle step until Redis takes it; errors other than an outage or a full Redis raise.
        ``first``: the step's first try, already sent and done (``answer_soon``)."""
        ctx = self.ctx
        give_up: float | None = None  # set at the first failure: most settles take one try
        backoff = _NO_BACKOFF
        while True:
            try:
                if first is not None:
                    tried, first = first, None
                    done = int(tried.result())
                else:
                    done = await step(*args)
            except _RETRYABLE as exc:
                full = isinstance(exc, rexc.ResponseError)
                if full and not _out_of_memory(exc):
                    raise
                if give_up is None:  # in Redis's clock, like the deadline
                    give_up = (deadline_ms if deadline_ms else ctx.clock.now_ms()) / 1000 + SETTLE_PATIENCE
                    backoff = Backoff()
                kind = "settle-oom" if full else "settle-unreachable"
                if ctx.clock.now_ms() / 1000 > give_up:
                    ctx.log.logger.error("worker %s: could not answer %s (%s); leaving it to other workers",
                                         ctx.worker_id, entry.id.decode(), exc)  # fmt: skip
                    return
                what = "is out of memory" if full else "is unreachable"
                ctx.log.log(logging.WARNING, kind, "worker %s: Redis %s (%s); answers wait and are retried",
                            ctx.worker_id, what, protocol.excerpt(str(exc), 200))  # fmt: skip
                await backoff.sleep()
                continue
            ctx.log.over(_SETTLE_TROUBLE, "worker %s: Redis takes answers again", ctx.worker_id)
            if done == 0:
                why = await self._why_not_mine(entry, deadline_ms)
                ctx.log.log(logging.WARNING, "lost", "worker %s: call %s %s; not answering it", ctx.worker_id,
                            entry.id.decode(), why)  # fmt: skip
            return

    async def _why_not_mine(self, entry: Entry, deadline_ms: int | None) -> str:
        """Why an entry this worker ran is no longer its own, for the log: an operator acts on a
        caller that gives up, a Redis that loses its data and a worker cut off quite differently."""
        ctx = self.ctx
        call_id = protocol.field_text(entry.fields, protocol.F_ID) or ""
        try:
            async with ctx.redis.pipeline(transaction=False) as pipe:
                pipe.exists(ctx.keys.gone(Keys.scope_of(entry.stream), call_id))
                pipe.xpending_range(entry.stream, GROUP, min=entry.id, max=entry.id, count=1)
                gone, holders = await pipe.execute(raise_on_error=False)
        except _RETRYABLE:
            return "is no longer this worker's (Redis cannot tell why now)"
        lost = "is gone from Redis with the service's stream: Redis lost its data (no persistence?)"
        if ctx.streams_lost_at_ms >= int(entry.id.split(b"-")[0]):
            return lost  # a caller told of the loss may have left its mark since: the loss came first
        if isinstance(holders, list) and holders:
            return "was taken over by another worker while this one was cut off"
        if isinstance(holders, Exception):  # NOGROUP: the stream or its group is gone
            return lost
        if gone == 1:
            return "was given up by its caller (it timed out, or stopped waiting) and withdrawn"
        if deadline_ms is not None and ctx.clock.now_ms() > deadline_ms:
            return "was withdrawn once its deadline passed (its caller gave up on it)"
        return (
            "is gone from Redis, and no caller withdrew it: Redis lost its data (a restart without "
            "persistence, or a failover to a replica that had not received it)"
        )

    async def _finish(self, entry: Entry, outcome: Reply) -> int:
        """Answer and acknowledge, in one script with the settles other calls have ready (finish.lua)."""
        return int(await self._finish_part(entry, outcome))

    def _finish_part(self, entry: Entry, outcome: Reply) -> asyncio.Future[Any]:
        ctx = self.ctx
        keys = [entry.stream]
        args: list[Any] = [entry.id, outcome.payload or b""]
        if outcome.reply_to is not None and outcome.payload is not None:
            keys.append(outcome.reply_to)
            if outcome.job:
                args.append("done" if outcome.ok else "failed")
        shared = (GROUP, ctx.worker_id, int(ctx.options.reply_ttl * 1000))
        return _FINISH.part(ctx.writer_for(Keys.scope_of(entry.stream)), keys, args, shared)

    async def _retry(self, entry: Entry, retry: Retry) -> int:
        """Put the call in the delayed set for its next attempt (@retry) and acknowledge it."""
        ctx = self.ctx
        outcome, deadline_ms = retry.failure, retry.failure.deadline_ms
        assert deadline_ms is not None, "a retry comes from a decoded call"
        delay_ms = int(retry.delay * 1000)
        # The new run keeps the call's deadline: its ttl counts from its due time.
        fields = protocol.next_attempt(entry.fields, deadline_ms - int(ctx.clock.now_ms()) - delay_ms)
        scope = Keys.scope_of(entry.stream)  # the next run waits in the delayed set of the entry's shard
        user = Keys.stream_user(entry.stream)
        if user is not None:  # and comes due on its caller user's stream
            fields[protocol.F_USER] = user.encode()
        keys = [entry.stream, ctx.keys.delayed(scope)]
        args: list[Any] = [entry.id, GROUP, ctx.worker_id, delay_ms, protocol.pack_fields(fields)]
        if outcome.job and outcome.reply_to is not None:
            keys.append(outcome.reply_to)
            args.append(outcome.payload or b"")
        else:  # a call: not again if its caller gave up
            keys.append(ctx.keys.gone(scope, protocol.field_text(fields, protocol.F_ID) or ""))
            args.append("")
        return int(await _RETRY(ctx.writer_for(scope), keys, args))

    async def _dead_letter(self, entry: Entry, reason: str, deliveries: int, answer: bool) -> int:
        ctx = self.ctx
        fields = entry.fields
        call_id = protocol.field_text(fields, protocol.F_ID)
        reply_to = protocol.field_text(fields, protocol.F_REPLY)
        job = protocol.job_token(fields)
        scope = Keys.scope_of(entry.stream)  # the entry's shard: its dead letters and replies
        if job is not None:  # a job's outcome goes to its hash, whatever its fields say of a reply
            reply_to = ctx.keys.job(scope, job)
        keys = [entry.stream, ctx.keys.dead(scope)]
        payload = b""
        if (
            answer
            and call_id
            and reply_to
            and (job is not None or reply_to.startswith(_reply_prefix(ctx, entry.stream)))
            and len(reply_to) < 256
        ):
            keys.append(reply_to)
            payload = protocol.encode_error(call_id[:256], WireError.DEAD_LETTERED, reason, ctx.worker_id)
        dead = protocol.dead_letter_fields(
            fields, reason=reason, deliveries=deliveries, worker=ctx.worker_id, source_id=entry.id,
            max_size=ctx.options.max_payload + protocol.ENTRY_OVERHEAD, user=Keys.stream_user(entry.stream),
        )  # fmt: skip
        job_status = "dead" if len(keys) > 2 and job else ""
        args: list[Any] = [entry.id, GROUP, ctx.worker_id, ctx.options.dead_letter_maxlen, payload,
                           int(ctx.options.reply_ttl * 1000), job_status]  # fmt: skip
        args += protocol.flat_fields(dead)
        return int(await _DEAD_LETTER(ctx.redis, keys, args))


def _reply_prefix(ctx: WorkerContext, stream: str) -> str:
    """Where the replies to a stream's requests may go: its shard's reply streams, and only the user's
    own for a registered caller user's stream."""
    prefix = ctx.keys.reply_prefix(Keys.scope_of(stream))
    user = Keys.stream_user(stream)
    return prefix if user is None else f"{prefix}{user}{acl.USER_SEPARATOR}"


class Settling:
    """A reply's settle on its way (``Settlement.answer_soon``): its one try, and the rest when that
    try did not settle the call."""

    __slots__ = ("entry", "outcome", "settlement", "tried")

    def __init__(
        self, settlement: Settlement, entry: Entry, outcome: Reply, tried: asyncio.Future[Any]
    ) -> None:
        self.settlement = settlement
        self.entry = entry
        self.outcome = outcome
        self.tried = tried

    def settled(self) -> bool:
        """Once ``tried`` is done: True when it answered and acknowledged the call (nothing more to do)."""
        tried = self.tried
        if tried.cancelled() or tried.exception() is not None or not tried.result():
            return False
        ctx = self.settlement.ctx
        ctx.log.over(_SETTLE_TROUBLE, "worker %s: Redis takes answers again", ctx.worker_id)
        return True

    async def finish(self) -> None:
        """Once ``tried`` is done and did not settle the call: retry it (Redis out of reach or full),
        dead-letter it (its reply cannot be written) or log why it is no longer this worker's."""
        if not self.tried.cancelled():
            await self.settlement._answer(self.entry, self.outcome, first=self.tried)
