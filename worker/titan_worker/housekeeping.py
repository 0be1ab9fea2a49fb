"""Recovering what dead workers left: their pending calls, their own streams, their consumers.

An entry idle longer than the heartbeat TTL belongs to a dead worker (a live
one renews its entries every beat, from a thread user code cannot block), so
any live worker may claim it; its delivery count decides whether it runs
again or goes to the dead letters. Housekeeping never takes the worker
down: its failures are logged and tried again next time.
"""

from __future__ import annotations

import logging

from titan_broker._redis import Channel, Script, text
from titan_broker._wire import GROUP

from .call import Entry
from .context import WorkerContext

_RECLAIM = Script("reclaim")
_RESCUE = Script("rescue")
_DELETE_CONSUMER = Script("delete_consumer")
SWEEP_EVERY = 5
"""Reclaims between two sweeps of dead workers' streams and consumers."""


class Housekeeping:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._cursors: dict[str, str] = {}
        """Per shard's stream: where the walk of its pending list goes on."""
        self._reclaims = 0

    @property
    def sweep_due(self) -> bool:
        """Whether the last reclaim was one after which dead streams and consumers are swept."""
        return self._reclaims % SWEEP_EVERY == 0

    async def reclaim(
        self, via: Channel, stream: str, count: int, running: list[bytes]
    ) -> list[tuple[Entry, int]]:
        """Claim up to ``count`` calls of ``stream`` (a shard's) left pending by dead workers, each
        with its delivery count.

        ``running``: that stream's entries this worker runs now, never claimed again.
        """
        ctx = self.ctx
        min_idle = int(ctx.options.heartbeat_ttl * 1000)
        cursor, entries, counts = await _RECLAIM(
            via, [stream], [GROUP, ctx.worker_id, min_idle, self._cursors.get(stream, "-"), count, *running]
        )
        self._cursors[stream] = text(cursor)
        if stream == ctx.stream:
            self._reclaims += 1
        claimed = []
        for (entry_id, raw), deliveries in zip(entries, counts, strict=True):
            entry = Entry(stream, entry_id, dict(zip(raw[::2], raw[1::2], strict=True)))
            ctx.log.log(logging.WARNING, "claimed", "worker %s claimed %s of a dead worker (delivery %d)",
                        ctx.worker_id, entry_id.decode(), int(deliveries))  # fmt: skip
            claimed.append((entry, int(deliveries)))
        return claimed

    async def sweep(self) -> None:
        """Move dead workers' own streams to the shared one; remove their consumers once empty."""
        ctx = self.ctx
        try:
            for raw in await ctx.redis.smembers(ctx.keys.affinity(ctx.service)):
                if text(raw) != ctx.worker_id:
                    await self.rescue(text(raw))
            for consumer in await ctx.redis.xinfo_consumers(ctx.stream, GROUP):
                name = text(consumer["name"])
                if name == ctx.worker_id or int(consumer.get("pending", 0)):
                    continue
                keys = [ctx.stream, ctx.keys.worker(ctx.service, name)]
                if await _DELETE_CONSUMER(ctx.redis, keys, [GROUP, name]) == 1:
                    ctx.log.logger.info("worker %s removed the dead consumer %s", ctx.worker_id, name)
            await self._sweep_shards()
        except Exception as exc:  # housekeeping must never take the worker down
            ctx.log.log(logging.WARNING, "sweep", "worker %s: could not sweep dead workers (%s)",
                        ctx.worker_id, exc)  # fmt: skip

    async def rescue(self, worker_id: str) -> None:
        """Move the calls waiting on a dead worker's own streams onto the shared streams: every other
        shard's first, while its id is still in the affinity set (the first shard's rescue takes
        it out, and with it the worker from the next sweeps)."""
        ctx = self.ctx
        record = ctx.keys.worker(ctx.service, worker_id)
        for user in ctx.users:  # each user's own streams of the dead worker back onto the user's stream
            keys = [
                ctx.keys.user_worker_calls(ctx.service, worker_id, user),
                ctx.keys.user_calls(ctx.service, user),
            ]
            moved = await _RESCUE(ctx.redis, [*keys, record], [worker_id])
            if moved == -1:
                return  # it lives
            if moved and moved > 0:
                ctx.log.logger.warning("worker %s moved %d call(s) of the dead worker %s to the stream of "
                                       "user %s", ctx.worker_id, moved, worker_id, user)  # fmt: skip
        if len(ctx.scopes) > 1 and not await ctx.redis.exists(record):
            for scope in ctx.scopes[1:]:
                pairs = [(ctx.keys.worker_calls(scope, worker_id), ctx.keys.calls(scope))]
                pairs += [
                    (ctx.keys.user_worker_calls(scope, worker_id, user), ctx.keys.user_calls(scope, user))
                    for user in ctx.users
                ]
                for own, stream in pairs:
                    moved = await _RESCUE(ctx.redis, [own, stream], [worker_id])
                    if moved and moved > 0:
                        ctx.log.logger.warning("worker %s moved %d call(s) of the dead worker %s to %s",
                                               ctx.worker_id, moved, worker_id, stream)  # fmt: skip
        keys = [
            ctx.keys.worker_calls(ctx.service, worker_id),
            ctx.stream,
            ctx.keys.worker(ctx.service, worker_id),
            ctx.keys.affinity(ctx.service),
        ]
        moved = await _RESCUE(ctx.redis, keys, [worker_id])
        if moved and moved > 0:
            ctx.log.logger.warning("worker %s moved %d call(s) of the dead worker %s to the shared stream",
                                   ctx.worker_id, moved, worker_id)  # fmt: skip

    async def _sweep_shards(self) -> None:
        """Remove the consumers of the other streams (the registered users', the other shards') whose
        worker is gone (no registry record) and that hold nothing: delete_consumer.lua's check, made
        from here because a shard's stream and the worker records are in different slots."""
        ctx = self.ctx
        others = [*ctx.user_streams(ctx.service)]
        for scope in ctx.scopes[1:]:
            others += ctx.claimable(scope)
        for stream in others:
            for consumer in await ctx.redis.xinfo_consumers(stream, GROUP):
                name = text(consumer["name"])
                if name == ctx.worker_id or int(consumer.get("pending", 0)):
                    continue
                if not await ctx.redis.exists(ctx.keys.worker(ctx.service, name)):
                    await _DELETE_CONSUMER(ctx.redis, [stream], [GROUP, name])
