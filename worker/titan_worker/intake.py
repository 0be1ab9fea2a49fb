"""Taking calls in: read no more entries than there are free slots, and run each in a slot.

One long-lived task per slot, fed through a memory stream (much cheaper on
the hot path than a task per call). The read loop has a connection of its
own, so that stopping can end a blocked XREADGROUP with CLIENT UNBLOCK
(without that permission, within one read block). Every heartbeat interval
it first claims calls that dead workers left pending. If Redis loses the
stream or its group under the worker (a restart without persistence, a
FLUSHALL, a DEL), they are made again and the worker carries on.

A sharded service's streams are read by one read loop per shard, each on a
connection to its slot's node (a cluster refuses a read across slots). The
loops share the slots: a busy shard's loop reserves every free slot while it
blocks; a loop whose shard had nothing last time asks for one entry and
holds no slot, so no shard's calls wait behind another shard's blocked read,
and a worker holds at most one entry per idle shard more than its slots (it
runs no more than its slots at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
from redis import exceptions as rexc

from titan_broker._redis import CONNECTION_ERRORS, Backoff, Channel, stream_entries
from titan_broker._registry import user_names
from titan_broker._wire import GROUP, Keys, protocol

from .call import DeadLetter, Entry
from .context import WorkerContext
from .housekeeping import Housekeeping
from .settlement import Settling

Serve = Callable[[Entry, int], Awaitable[Settling | None]]
"""Runs and settles one entry, given its delivery count; must not raise. A settle it returns is on its
way: the entry stays in flight until it is done."""


class Lane:
    """One read loop: its connection, and the streams one XREADGROUP of it reads."""

    __slots__ = ("busy", "channel", "reader_at", "reader_id", "scope", "streams")

    def __init__(self, channel: Channel, streams: list[str]) -> None:
        self.channel = channel
        self.streams = streams
        """Replaced whole (never changed in place) when registered users are added."""
        self.scope = Keys.scope_of(streams[0])
        self.busy = False
        """Whether its last read found entries (it then reserves every free slot for its next)."""
        self.reader_id: int | None = None
        self.reader_at: tuple[str, int] | None = None


class Intake:
    """Reads the service's streams (one per shard) and this worker's own stream into
    ``concurrency`` slots."""

    def __init__(self, ctx: WorkerContext, housekeeping: Housekeeping, serve: Serve) -> None:
        self.ctx = ctx
        self.housekeeping = housekeeping
        self.serve = serve
        self.in_flight = 0
        self._active: dict[str, set[bytes]] = {stream: set() for stream in ctx.streams}
        """Per stream any worker may claim from (each shard's, and each registered user's in it), the
        ids of its entries in flight (read by the heartbeat thread)."""
        self._reserved = 0
        """Slots the read loops blocked in a read hold for what it may return."""
        self._lock = threading.Lock()
        self._freed = anyio.Event()
        self._stopping = False
        self._stop_requested = anyio.Event()
        self._reading = False
        self._lanes: list[Lane] = []
        self._slots: anyio.abc.TaskGroup | None = None

    def poisoned(self, entry: Entry, deliveries: int) -> DeadLetter | None:
        """An entry delivered more often than its method's ``max_deliveries`` (each worker running it
        died, or it was moved off dead workers' streams that often) goes to the dead letters unrun."""
        ctx = self.ctx
        method = protocol.field_text(entry.fields, protocol.F_METHOD)
        limit = ctx.options.max_deliveries or ctx.definition.max_deliveries(method)
        moves = protocol.moves(entry.fields)
        if deliveries > limit or moves >= limit:
            count = max(deliveries, moves + 1)
            # The delivery that finds the limit passed does not run it: every one before it did.
            runs = f"it ran {count - 1} time{'s' if count != 2 else ''} and the worker running it"
            what = runs if deliveries > limit else "the workers holding it"
            reason = (
                f"{(method or '?')[:128]}() was delivered {count} times (max_deliveries {limit}): {what} "
                f"died each time; it was moved to the dead letters of {ctx.service!r}"
            )
            return DeadLetter(reason, deliveries=count)
        return None

    def active_ids(self) -> dict[str, list[bytes]]:
        """Per shard's stream, its entries in flight (thread-safe: for the heartbeat)."""
        with self._lock:
            return {stream: list(ids) for stream, ids in self._active.items() if ids}

    def _running(self, stream: str) -> list[bytes]:
        with self._lock:
            return list(self._active.get(stream, ()))

    def stop(self) -> None:
        """Stop reading (the calls in flight go on)."""
        self._stopping = True
        self._stop_requested.set()
        self._freed.set()

    async def ensure_groups(self) -> None:
        """Make the streams and their consumer group (id 0: calls queued before are seen)."""
        ctx = self.ctx
        await self.refresh_users(create=False)
        for scope in ctx.scopes:
            await self._create_groups(ctx.lane_streams(scope))

    async def _create_groups(self, streams: list[str]) -> None:
        for stream in streams:
            try:
                await self.ctx.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def refresh_users(self, *, create: bool = True) -> None:
        """Read the service's registered caller users; read the streams of those new to this worker
        from now on, their group made first (``create``). A user taken out of the set stays read
        until the worker stops: its streams may still hold calls."""
        ctx = self.ctx
        try:
            members = await ctx.redis.smembers(ctx.keys.users(ctx.service))
        except rexc.ResponseError as exc:  # not a set (written by something else), or refused
            ctx.log.log(logging.WARNING, "users", "worker %s: cannot read the registered users of %r (%s)",
                        ctx.worker_id, ctx.service, exc)  # fmt: skip
            return
        new = [user for user in user_names(members) if user not in ctx.users]
        if not new:
            return
        if create:
            for scope in ctx.scopes:
                for user in new:
                    own = ctx.keys.user_worker_calls(scope, ctx.worker_id, user)
                    await self._create_groups([ctx.keys.user_calls(scope, user), own])
        ctx.users = [*ctx.users, *new]
        self._sync_lanes()

    def _sync_lanes(self) -> None:
        """Each lane reads its shard's streams as the registered users now make them."""
        ctx = self.ctx
        with self._lock:
            for scope in ctx.scopes:
                for stream in ctx.claimable(scope):
                    self._active.setdefault(stream, set())
        for lane in self._lanes:
            streams = ctx.lane_streams(lane.scope)
            if streams != lane.streams:
                lane.streams = streams

    async def run(self, lanes: list[Lane], grace: float) -> None:
        """Read and serve until stop(), then let calls in flight finish within ``grace`` seconds."""
        ctx = self.ctx
        self._lanes = lanes
        self._sync_lanes()
        for lane in lanes:
            # Redis may be lost already: the read loop below reconnects and notes the id again.
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._note_reader_id(lane)
        # An asyncio queue, not an anyio memory stream: a third of the cost per entry. Never more
        # entries in it than free slots (the read asks for no more), and the slots end cancelled.
        queue: asyncio.Queue[tuple[Entry, int]] = asyncio.Queue()
        async with anyio.create_task_group() as slots:
            self._slots = slots
            for _ in range(ctx.options.concurrency):
                slots.start_soon(self._slot, queue)
            async with anyio.create_task_group() as helpers:
                helpers.start_soon(self._unblock_on_stop)
                self._reading = True
                try:
                    async with anyio.create_task_group() as reads:
                        for lane in lanes:
                            reads.start_soon(self._read, lane, queue.put_nowait, slots)
                finally:
                    self._reading = False
                helpers.cancel_scope.cancel()
            with anyio.move_on_after(grace):
                while self.in_flight:
                    await self._wait_freed()
            if self.in_flight:
                # Unacknowledged entries stay pending and are claimed by another worker.
                ctx.log.logger.warning(
                    "worker %s: grace period of %.1f s over, abandoning %d call(s) to other workers",
                    ctx.worker_id, grace, self.in_flight,
                )  # fmt: skip
            slots.cancel_scope.cancel()
        self._slots = None

    async def _wait_freed(self) -> None:
        freed = self._freed
        await freed.wait()
        # Only the first of several waiters (a sharded service's read loops) makes a new event: the
        # others would put theirs in its place, and a loop waiting on a replaced one waits forever.
        if self._freed is freed:
            self._freed = anyio.Event()

    async def _slot(self, queue: asyncio.Queue[tuple[Entry, int]]) -> None:
        while True:
            entry, deliveries = await queue.get()
            settling = None
            try:
                settling = await self.serve(entry, deliveries)
            except Exception:  # serve() answers every failure itself; this is a last resort
                self.ctx.log.logger.exception("worker %s: failed to serve %s", self.ctx.worker_id,
                                              entry.id.decode())  # fmt: skip
            finally:
                if settling is None:
                    self._done(entry)
                else:
                    # The slot takes the next entry meanwhile: no task wakes per call to see the
                    # settle done, and the entry stays in flight (reads count it) until it is.
                    settling.tried.add_done_callback(functools.partial(self._settled, settling))

    def _settled(self, settling: Settling, _: object) -> None:
        if settling.settled():
            self._done(settling.entry)
            return
        slots = self._slots
        if slots is not None:
            try:
                slots.start_soon(self._finish, settling)
                return
            except RuntimeError:  # the slots are closed: the worker stops
                pass
        self._done(settling.entry)

    async def _finish(self, settling: Settling) -> None:
        try:
            await settling.finish()
        except Exception:
            self.ctx.log.logger.exception("worker %s: failed to settle %s", self.ctx.worker_id,
                                          settling.entry.id.decode())  # fmt: skip
        finally:
            self._done(settling.entry)

    def _take(self, entry: Entry) -> None:
        self.in_flight += 1
        active = self._active.get(entry.stream)
        if active is not None:  # a shard's stream, not this worker's own (nobody claims from that)
            with self._lock:
                active.add(entry.id)

    def _done(self, entry: Entry) -> None:
        active = self._active.get(entry.stream)
        if active is not None:
            with self._lock:
                active.discard(entry.id)
        self.in_flight -= 1
        self._freed.set()

    async def _read(
        self, lane: Lane, dispatch: Callable[[tuple[Entry, int]], None], slots: anyio.abc.TaskGroup
    ) -> None:
        ctx = self.ctx
        reader = lane.channel
        block_ms = max(1, int(ctx.options.read_block * 1000))
        backoff = Backoff()
        next_reclaim = 0.0
        streams: list[str] = []
        shards: list[str] = []
        read: list[str | int] = []
        concurrency = ctx.options.concurrency
        several = len(self._lanes) > 1
        while not self._stopping:
            if lane.streams is not streams:  # registered users were added: read their streams too
                streams = lane.streams
                shards = [stream for stream in streams if stream in self._active]
                read = ["XREADGROUP", "GROUP", GROUP, ctx.worker_id, "COUNT", 0, "BLOCK", block_ms, "STREAMS",
                        *streams, *[">"] * len(streams)]  # fmt: skip
            free = concurrency - self.in_flight - self._reserved
            # An idle shard's loop (several loops, its last read found nothing) asks for one entry
            # and holds no slot meanwhile: it may take one more than the slots (the slot tasks still
            # run no more than ``concurrency`` at once), and a busy shard gets every slot.
            idle = several and not lane.busy
            if free <= 0 and not idle:
                await self._wait_freed()
                continue
            ask = 1 if idle else free
            held = 0 if idle else ask
            self._reserved += held
            try:
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + ctx.options.heartbeat_interval
                    if lane.scope == ctx.service:  # the first shard's loop reads the users for all
                        await self.refresh_users()
                        if lane.streams is not streams:
                            next_reclaim = 0.0
                            continue  # read (and reclaim from) the new users' streams too
                    # Up to every free slot, this loop's own included, whatever it asks to read.
                    quota = max(0, concurrency - self.in_flight - self._reserved + held)
                    claimed: list[tuple[Entry, int]] = []
                    for shard in shards:
                        left = quota - len(claimed)
                        if left > 0:
                            running = self._running(shard)
                            claimed += await self.housekeeping.reclaim(reader, shard, left, running)
                    if quota and len(claimed) >= quota:
                        next_reclaim = 0.0  # more may be left: look again once slots free up
                    if ctx.stream in shards and self.housekeeping.sweep_due:
                        slots.start_soon(self.housekeeping.sweep)
                    for entry, deliveries in claimed:
                        self._take(entry)
                        dispatch((entry, deliveries))
                    if claimed:
                        continue  # slots changed; recount before reading
                read[5] = ask
                response = await reader.execute(*read)
                backoff.reset()
            except rexc.ResponseError as exc:
                message = str(exc)
                if "NOGROUP" not in message and "no longer exists" not in message:
                    raise
                # The stream or its group was deleted under us (FLUSHALL, DEL, a restart without
                # persistence): make them again; the heartbeat registers the worker again.
                ctx.streams_lost_at_ms = ctx.clock.now_ms()
                ctx.log.log(logging.WARNING, "lost-stream",
                            "worker %s: Redis lost the service's stream or group (%s); made them again",
                            ctx.worker_id, message)  # fmt: skip
                with contextlib.suppress(*CONNECTION_ERRORS, rexc.ResponseError):
                    await self.ensure_groups()
                await backoff.sleep()
                continue
            except CONNECTION_ERRORS as exc:
                ctx.log.log(logging.WARNING, "read-unreachable", "worker %s lost Redis (%s); reconnecting",
                            ctx.worker_id, exc)  # fmt: skip
                lane.reader_id = None
                await backoff.sleep()
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await self._note_reader_id(lane)
                continue
            finally:
                self._reserved -= held
                if several:
                    self._freed.set()  # the slots this read held and did not fill are free again
            lane.busy = False
            for stream, entry_id, fields in stream_entries(response):
                entry = Entry(stream.decode(), entry_id, fields)
                self._take(entry)
                dispatch((entry, 1))
                lane.busy = True
            # Let the new calls run (and a quick one reply) before the next read is sent.
            await anyio.lowlevel.checkpoint()

    async def _note_reader_id(self, lane: Lane) -> None:
        """Note the lane's connection id, and on which node it holds (for CLIENT UNBLOCK)."""
        lane.reader_id = await lane.channel.execute("CLIENT", "ID")
        lane.reader_at = lane.channel.address

    async def _unblock_on_stop(self) -> None:
        await self._stop_requested.wait()
        # Repeat: a reader may be between two reads when the first unblock lands.
        while self._reading:
            for lane in self._lanes:
                reader = lane.channel
                writer = self.ctx.writer_for(Keys.scope_of(lane.streams[0]))
                # Through the writer of the lane's shard, which follows the same slot as the reader
                # (a cluster's pooled client would pick a node of its own), and only while both speak
                # to the node the id was read on: a connection id means another client on another
                # node. Otherwise the read ends by itself within its block.
                if lane.reader_id is not None and lane.reader_at == reader.address == writer.address:
                    with contextlib.suppress(*CONNECTION_ERRORS, rexc.ResponseError):
                        await writer.execute("CLIENT", "UNBLOCK", lane.reader_id)
            await anyio.sleep(0.05)
