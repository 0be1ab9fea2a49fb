"""@cache(invalidated_by=...): a successful call of a method named there empties that cache.

The generation counters are bumped before the caller gets the answer, so a
caller that wrote and then reads never sees the old value. If Redis cannot
take the bump (even after retrying through an outage, until the call's
deadline), the caller is told so with an InternalError: the method ran, but
the cache may be stale. It is never run again for it.
"""

from __future__ import annotations

import logging

from titan_broker._errors import WireError
from titan_broker._redis import CONNECTION_ERRORS, Backoff
from titan_broker._service import MethodSpec

from ..call import Call, Middleware, Next, Outcome, safe_str
from ..context import WorkerContext

FEATURE = None  # derived: from the @cache(invalidated_by=...) of other methods


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware | None:
    cached = [
        m.name
        for m in ctx.definition.methods.values()
        if m.cache is not None and spec.name in m.cache.invalidated_by
    ]
    if not cached:
        return None
    counters = [ctx.keys.cache_generation(ctx.service, name) for name in cached]

    async def bump() -> None:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for key in counters:
                pipe.incr(key)
            await pipe.execute()

    async def invalidate(call: Call, call_next: Next) -> Outcome:
        outcome = await call_next(call)
        if not outcome.ok:
            return outcome
        backoff = Backoff()
        while True:
            try:
                await bump()
                return outcome
            except CONNECTION_ERRORS:
                if call.remaining() <= 0:
                    break
                await backoff.sleep(call.remaining())
            except Exception as exc:
                message = (
                    f"{call.method}() ran, but the cache of {', '.join(cached)}() could not be "
                    f"invalidated ({safe_str(exc, 200)}); cached results may be stale"
                )
                outcome = call.raised(exc, WireError.INTERNAL, message, ran=True)
                ctx.log.log(logging.ERROR, f"invalidate:{spec.name}", "worker %s: %s [error %s]",
                            ctx.worker_id, message, call.error_id, exc_info=exc)  # fmt: skip
                return outcome
        return call.fail(
            WireError.INTERNAL,
            f"{call.method}() ran, but Redis was unreachable until its deadline, so the cache of "
            f"{', '.join(cached)}() could not be invalidated; cached results may be stale",
            {"ran": True},
        )

    return invalidate
