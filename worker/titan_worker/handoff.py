"""Rolling upgrades: a call for a method this worker lacks goes to a worker that has it.

While old and new versions of a service serve side by side (every deploy),
a call to a method only the new version has may land on an old worker. It
hands the entry to a live worker whose registry record lists the method
(onto that worker's own stream, atomically). MethodNotFound is answered only
when no live worker has the method, and at once. A method the new version
removed is answered by old workers while they live, and MethodNotFound after.
"""

from __future__ import annotations

import logging
import random
import time

from titan_broker._errors import WireError
from titan_broker._redis import Script, text
from titan_broker._registry import read_workers
from titan_broker._wire import GROUP, Keys, protocol

from .call import Entry, HandedOff, Outcome, Reply
from .context import WorkerContext

_HANDOFF = Script("handoff")
LOOKUP_TTL = 1.0
"""Seconds a worker trusts what it read of the other workers' methods."""
MAX_MOVES = 3
"""Hand-offs one call may take (the target may be gone by the time it reads)."""


class Handoff:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._seen_at = 0.0
        self._methods: dict[str, set[str]] = {}
        """Live worker id -> its public methods, as last read."""

    async def unknown_method(self, entry: Entry, req: protocol.Request) -> Outcome:
        """Hand the call to a live worker that has the method, else answer MethodNotFound."""
        ctx = self.ctx
        moves = protocol.moves(entry.fields)
        if moves < MAX_MOVES:
            try:
                scope = Keys.scope_of(entry.stream)  # the entry's shard: its reply key is there
                for target in await self._workers_with(req.method):
                    user = Keys.stream_user(entry.stream)  # a user's call: to the target's stream of it
                    own = ctx.keys.worker_calls(scope, target)
                    keys = [
                        entry.stream,
                        own if user is None else ctx.keys.user_worker_calls(scope, target, user),
                    ]
                    if scope == ctx.service:
                        keys.append(ctx.keys.worker(ctx.service, target))  # checked in the script
                    elif not await ctx.redis.exists(ctx.keys.worker(ctx.service, target)):
                        continue  # the record is in another slot: checked before (see rescue)
                    done = await _HANDOFF(ctx.redis, keys, [entry.id, GROUP, ctx.worker_id])
                    if done == 1:
                        ctx.log.log(logging.INFO, "handoff", "worker %s: handed %s() to worker %s",
                                    ctx.worker_id, req.method, target)  # fmt: skip
                        return HandedOff()
                    if done == 0:
                        return HandedOff()  # no longer ours: nothing to answer
            except Exception as exc:  # no hand-off: answer as if nobody had it
                ctx.log.log(logging.WARNING, "handoff-failed", "worker %s: could not hand %s() on (%s)",
                            ctx.worker_id, req.method, exc)  # fmt: skip
        public = ", ".join(sorted(ctx.definition.methods)) or "none"
        payload = protocol.encode_error(
            req.call_id,
            WireError.METHOD_NOT_FOUND,
            f"service {ctx.service!r} has no public method {req.method!r} (public: {public})",
            ctx.worker_id,
        )
        return Reply(False, req.deadline_ms, req.reply_to, payload, job=req.job is not None)

    async def _workers_with(self, method: str) -> list[str]:
        """Live workers of this service, other than this one, whose records list ``method``."""
        if time.monotonic() - self._seen_at > LOOKUP_TTL:
            await self._refresh()
        found = [wid for wid, methods in self._methods.items() if method in methods]
        random.shuffle(found)
        return found

    async def _refresh(self) -> None:
        ctx = self.ctx
        ids = [text(w) for w in await ctx.redis.smembers(ctx.keys.workers(ctx.service))]
        others = [w for w in ids if w != ctx.worker_id]
        records = await read_workers(ctx.redis, ctx.keys, ctx.service, others)
        self._methods = {r.worker_id: set(r.method_names) for r in records}
        self._seen_at = time.monotonic()
