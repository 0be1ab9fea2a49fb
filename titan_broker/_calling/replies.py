"""The reply dispatcher: one task per client reads its reply stream and hands each reply to its caller.

Replies for all calls of a client arrive on one stream (``<ns>:reply:<client>``),
read with XREAD from the last id seen, and are matched to their callers by
call id; a reply nobody waits for (a duplicate, or one for a caller that gave
up) is dropped. The dispatcher survives anything on the reply side:

- Redis unreachable: it retries with backoff; a read lost in the middle is
  read again from the last id.
- Redis restarted, or failed over to a replica (cluster, Sentinel): after
  each reconnect it compares the node's ``run_id`` with the one it knew.
  When it changed and Redis lost its data (the client's canary key is gone:
  a restart without persistence, or a failover to a replica that had not
  received it), every waiting call whose request entry is gone too, and
  whose reply did not come, fails at once with CallLost instead of waiting
  for its timeout.
- The reply key overwritten with another type (WRONGTYPE): it deletes the
  key, fails the calls waiting at that moment with CallLost naming the key
  (their replies may be lost) and carries on; later calls work.
- A read Redis refuses for the ACL user's rules: not an outage, so the calls
  waiting at that moment fail with AccessDenied instead of waiting for their
  timeout; the loop tries again after a backoff (the rule may be granted), and
  calls made meanwhile fail at its next refusal.
- Anything else: logged, and the loop goes on after a backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import NamedTuple

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream
from redis import exceptions as rexc

from .._errors import CallLost, RemoteError, TitanError, WireError, remote_error
from .._redis.backoff import Backoff
from .._redis.connection import CONNECTION_ERRORS, Channel, stream_entries, text
from .._redis.denied import access_denied, is_denied
from .._wire import protocol

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 1000
"""How long one XREAD blocks (the channel's socket timeout must exceed it)."""
TRIM_EVERY = 1.0
"""Seconds between two trims of the replies already read (sooner after 1,024 replies)."""
TRIM_REFUSED_EVERY = 60.0
"""Seconds between two tries at trimming while the ACL user's rule refuses it."""
CANARY_TTL_MS = 600_000
CANARY_EVERY = 60.0
"""The canary key is rewritten this often (seconds), with CANARY_TTL_MS to live."""

_REPAIR_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, rexc.ResponseError)

StreamItem = protocol.Reply | TitanError
"""What a streaming call's queue carries: its replies, or the error that ends it."""


def parse_run_id(info: bytes | str) -> str | None:
    """The ``run_id`` field of an ``INFO server`` reply."""
    for line in text(info).splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip()
    return None


class Placement(NamedTuple):
    """Where a request went: the streams it may be in (an affinity call may fall back to the shared one)
    and its entry id; or, ``delayed``, the delayed set and its member. A job's hash comes along
    (``job``: withdrawing the request cancels the job)."""

    streams: tuple[str, ...]
    entry_id: bytes
    delayed: bool = False
    job: str | None = None

    def with_entry(self, entry_id: bytes) -> Placement:
        """This placement, at ``entry_id`` (known once Redis answers the submit)."""
        return self._replace(entry_id=entry_id)


class ReplyDispatcher:
    """Routes replies from one reply stream to the calls that wait for them.

    A caller registers its call (``expect`` for a single answer, ``expect_stream``
    for a streaming one) and, once its request is in Redis, where it is
    (``placed``), so that a restart that lost it can be told; ``forget`` when done.
    """

    def __init__(
        self, channel: Channel, reply_key: str, on_reconnect: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.channel = channel
        self.on_reconnect = on_reconnect
        """Awaited after the dispatcher reached Redis again: the client's other connections are stale too."""
        self.reply_key = reply_key
        self._canary = f"{reply_key}:alive"
        self._calls: dict[str, asyncio.Future[protocol.Reply]] = {}
        self._streams: dict[str, MemoryObjectSendStream[StreamItem]] = {}
        self._placements: dict[str, Placement] = {}
        self._failed: dict[str, TitanError] = {}
        """Errors for streaming calls whose queue was full when they failed (the queue is closed instead)."""
        self.run_id: str | None = None
        self.restarts = 0
        """Restarts of Redis seen (with or without its data)."""
        self._last = b"0-0"
        self._untrimmed = 0
        """Replies read since the stream was last trimmed."""
        self._trim_allowed = True
        """False while Redis refuses XTRIM to this ACL user."""

    def expect(self, call_id: str, fut: asyncio.Future[protocol.Reply]) -> None:
        """Route the reply of ``call_id`` to ``fut``."""
        self._calls[call_id] = fut

    def expect_stream(self, call_id: str, items: MemoryObjectSendStream[StreamItem]) -> None:
        """Route the items of streaming call ``call_id`` to ``items``."""
        self._streams[call_id] = items

    def placed(self, call_id: str, placement: Placement) -> None:
        """The request of ``call_id`` is in Redis at ``placement``: a restart that loses it is told."""
        self._placements[call_id] = placement

    def failure(self, call_id: str) -> TitanError | None:
        """Why a streaming call whose queue was full ended (its queue was closed instead of told)."""
        return self._failed.pop(call_id, None)

    def forget(self, call_id: str) -> None:
        """The call is over: route nothing more to it."""
        self._calls.pop(call_id, None)
        self._streams.pop(call_id, None)
        self._placements.pop(call_id, None)
        self._failed.pop(call_id, None)

    @property
    def idle(self) -> bool:
        """No call waits on this dispatcher."""
        return not self._calls and not self._streams and not self._placements

    def placements(self) -> list[tuple[str, Placement, bool]]:
        """Each call whose request is in Redis: its id, where the request is, and whether it streams."""
        return [(call_id, placed, call_id in self._streams) for call_id, placed in self._placements.items()]

    @property
    def own_keys(self) -> tuple[str, str]:
        """The keys this dispatcher owns (its reply stream and its canary): deleted when it closes."""
        return self.reply_key, self._canary

    async def start(self) -> None:
        """Note which Redis this is (its run_id) and write the canary; raises redis-py errors.

        A user whose ACL rules deny INFO works too, without the restart check.
        """
        try:
            self.run_id = parse_run_id(await self.channel.execute("INFO", "server"))
        except rexc.NoPermissionError:
            logger.warning(
                "this Redis user may not run INFO: calls lost by a Redis restart without persistence "
                "will time out instead of failing at once with CallLost (allow +info to fix)"
            )
            return
        await self._write_canary()

    async def _write_canary(self) -> None:
        try:
            await self.channel.execute("SET", self._canary, "1", "PX", CANARY_TTL_MS)
        except rexc.ResponseError as exc:  # out of memory: the restart check then assumes data loss
            logger.warning("cannot write %s (%s)", self._canary, exc)

    async def run(self) -> None:
        """Read and route replies until cancelled."""
        backoff = Backoff()
        next_trim = time.monotonic() + TRIM_EVERY
        next_canary = time.monotonic() + CANARY_EVERY
        reconnected = False
        denied = False  # refused by the ACL rules at the last try: said once per spell
        while True:
            try:
                if reconnected:
                    await self._check_restart()
                    reconnected = False
                    if self.on_reconnect is not None:
                        await self.on_reconnect()
                now = time.monotonic()
                if self._untrimmed and (self._untrimmed >= 1024 or now >= next_trim):
                    await self._trim()
                    next_trim = now + (TRIM_EVERY if self._trim_allowed else TRIM_REFUSED_EVERY)
                if now >= next_canary:
                    next_canary = now + CANARY_EVERY
                    await self._write_canary()
                res = await self.channel.execute(
                    "XREAD", "COUNT", 256, "BLOCK", READ_BLOCK_MS, "STREAMS", self.reply_key, self._last
                )
                backoff.reset()
                denied = False
            except CONNECTION_ERRORS as exc:
                delay = backoff.next()
                logger.warning("reply dispatcher lost Redis (%s); retrying in %.2f s", exc, delay)
                reconnected = True
                await anyio.sleep(delay)
                continue
            except rexc.ResponseError as exc:
                if is_denied(exc):
                    doing = "read the replies (the calls waiting were sent, and may have run)"
                    refusal = partial(access_denied, exc, doing, "XREAD", self.reply_key)
                    count = self.fail_all(refusal)
                    if not denied:
                        logger.error("%s; failed %d waiting call(s); trying again", refusal(), count)
                    denied = True
                    await anyio.sleep(backoff.next())
                elif str(exc).startswith("WRONGTYPE"):
                    await self._recover_clobbered_key()
                else:
                    delay = backoff.next()
                    logger.error("reply dispatcher: Redis refused a read of %s: %s", self.reply_key, exc)
                    await anyio.sleep(delay)
                continue
            except Exception:
                delay = backoff.next()
                logger.exception("reply dispatcher: unexpected error; going on in %.2f s", delay)
                await anyio.sleep(delay)
                continue
            if self._route(res):
                # Let the callers just answered run (and send their next call) before reading again.
                await anyio.lowlevel.checkpoint()

    async def _trim(self) -> None:
        """Remove the replies already read. Everything before the last one read has been read (a
        stream only grows at its end): trimming removes whole nodes, where XDEL searches each id."""
        try:
            await self.channel.execute("XTRIM", self.reply_key, "MINID", self._last)
        except rexc.ResponseError as exc:
            if not is_denied(exc):
                raise
            # A rule written before replies were trimmed: the replies are still read (a call that
            # ran is answered); the stream grows until the caller leaves it or the rule is fixed.
            if self._trim_allowed:
                refused = access_denied(exc, "trim the replies read", "XTRIM", self.reply_key)
                logger.error("%s; replies are read but not trimmed until it does", refused)
            self._trim_allowed = False
            return
        self._trim_allowed = True
        self._untrimmed = 0

    def _route(self, res: object) -> bool:
        """Hand each reply in an XREAD answer to its caller; True when there were any."""
        entries = stream_entries(res)
        self._untrimmed += len(entries)
        for _stream, _entry_id, fields in entries:
            reply = protocol.decode_reply(fields.get(protocol.F_REPLY_VALUE, b""))
            if reply is None:
                logger.warning("dropped a malformed reply on %s", self.reply_key)
                continue
            stream = self._streams.get(reply.call_id)
            if stream is not None:
                try:
                    stream.send_nowait(reply)
                except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    logger.warning("dropped an item of stream %s: its reader is gone", reply.call_id)
                continue
            fut = self._calls.get(reply.call_id)
            if fut is not None and not fut.done():
                fut.set_result(reply)
        if entries:
            self._last = entries[-1][1]
        return bool(entries)

    def fail(self, call_id: str, error: TitanError) -> None:
        """End one waiting call with ``error`` (a streaming call after the items it has)."""
        fut = self._calls.get(call_id)
        if fut is not None and not fut.done():
            fut.set_exception(error)
        stream = self._streams.get(call_id)
        if stream is not None:
            try:
                stream.send_nowait(error)
            except anyio.WouldBlock:
                stream.close()  # its reader finds the end of the queue and asks why: see ``failed``
                self._failed[call_id] = error
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    def fail_all(self, make_error: Callable[[], TitanError]) -> int:
        """End every waiting call, each with an error of its own; return how many."""
        waiting = [c for c, f in self._calls.items() if not f.done()] + list(self._streams)
        for call_id in waiting:
            self.fail(call_id, make_error())
        return len(waiting)

    async def _recover_clobbered_key(self) -> None:
        """The reply key holds something else than a stream: delete it, fail the waiting calls."""
        key = self.reply_key
        try:
            kind = text(await self.channel.execute("TYPE", key))
            if kind != "stream":
                await self.channel.execute("DEL", key)
        except _REPAIR_ERRORS as exc:
            logger.warning("reply dispatcher: cannot repair %s yet (%s)", key, exc)
            await anyio.sleep(0.1)
            return
        self._last = b"0-0"
        self._untrimmed = 0
        count = self.fail_all(
            lambda: CallLost(
                f"the reply stream {key} was overwritten with a {kind} value by someone else: the "
                "replies to the calls waiting on it may be lost, and the call may or may not have run "
                "(the key was deleted: later calls work)"
            )
        )
        logger.error(
            "reply key %s held a %s instead of a stream: deleted it, failed %d waiting call(s)",
            key, kind, count,
        )  # fmt: skip

    async def _check_restart(self) -> None:
        """After a reconnect: if Redis restarted and lost its data, fail the calls it lost."""
        if self.run_id is None:
            return  # INFO is denied (or tells no run_id): no way to tell a restart
        run_id = parse_run_id(await self.channel.execute("INFO", "server"))
        if run_id is None or run_id == self.run_id:
            return
        previous = self.run_id
        if await self.channel.execute("EXISTS", self._canary):
            # Restarted with its data, or a failover to a replica (cluster, Sentinel). Nothing is
            # failed here: a request moved under a new id (rescue, hand-off) cannot be told from a
            # lost one by its old id, and a request the replica had not received times out.
            logger.warning("Redis changed (run_id %s -> %s: a restart or a failover) and kept its data",
                           previous, run_id)  # fmt: skip
        else:
            await self._fail_lost(previous, run_id)
            await self._write_canary()
        # Only now: a check cut short by another disconnect is made again after the next reconnect.
        self.run_id = run_id
        self.restarts += 1

    async def _fail_lost(self, previous: str | None, run_id: str) -> None:
        """Redis lost its data: fail the waiting calls whose request is gone and whose reply did not come."""
        # Which waiting calls' requests are gone? Check first, then read the replies
        # written until now: a request answered before the check has its reply there.
        waiting = list(self._placements.items())
        commands: list[tuple[object, ...]] = [
            # A delayed call is its member of the delayed set (its score when it is still there).
            ("ZSCORE", key, placement.entry_id)
            if placement.delayed
            else ("XRANGE", key, placement.entry_id, placement.entry_id)
            for _, placement in waiting
            for key in placement.streams
        ]
        found = await self.channel.execute_many(commands) if commands else []
        gone: list[str] = []
        i = 0
        for call_id, placement in waiting:
            answers = found[i : i + len(placement.streams)]
            i += len(placement.streams)
            if not any(a and not isinstance(a, Exception) for a in answers):
                gone.append(call_id)
        while self._route(
            await self.channel.execute("XREAD", "COUNT", 256, "STREAMS", self.reply_key, self._last)
        ):
            pass
        lost = 0
        for call_id in gone:
            fut = self._calls.get(call_id)
            if (fut is not None and not fut.done()) or call_id in self._streams:
                lost += 1
                self.fail(
                    call_id,
                    CallLost(
                        f"Redis restarted or failed over (run_id {previous} -> {run_id}) and lost this "
                        "call's request before it was answered; the call may or may not have run"
                    ),
                )
        if lost:
            logger.error(
                "Redis restarted or failed over (run_id %s -> %s) and lost data: %d waiting call(s) lost",
                previous, run_id, lost,
            )  # fmt: skip


def error_of(reply: protocol.Reply) -> RemoteError:
    """The exception an error reply stands for."""
    error = reply.error or {}
    details = error.get("details")
    return remote_error(
        str(error.get("type", WireError.UNKNOWN)),
        str(error.get("message", "")),
        details if isinstance(details, dict) else None,
    )
