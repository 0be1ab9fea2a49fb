"""@rate_limit: a token bucket per method (and per key), in the worker or service-wide in Redis.

A refused call is answered RateLimited at once, with ``retry_after``; it is
never queued. The service-wide bucket is one Lua script with Redis's clock.
"""

from __future__ import annotations

import time

from titan_broker._errors import WireError
from titan_broker._redis import Script
from titan_broker._service import MethodSpec, RateLimitOptions

from ..call import Call, Middleware, Next, Outcome
from ..context import WorkerContext
from .cache import cache_key

FEATURE = RateLimitOptions.feature
_TAKE = Script("rate_limit")
MAX_LOCAL_BUCKETS = 10_000
"""Per-key buckets kept in one worker; the least recently used go first (bounded memory)."""


class LocalBucket:
    """A token bucket in this worker."""

    def __init__(self, rps: float, burst: int) -> None:
        self.rps = rps
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 when a token was taken, else the seconds until one is due."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rps)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rps


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware | None:
    limit = spec.rate_limit
    if limit is None:
        return None
    buckets: dict[str, LocalBucket] = {}

    async def wait_for(call: Call) -> float:
        key = cache_key(limit, call.request.args, call.request.kwargs) if limit.key is not None else ""
        if limit.scope == "worker":
            bucket = buckets.pop(key, None) or LocalBucket(limit.rps, limit.burst)
            buckets[key] = bucket  # most recently used last
            if len(buckets) > MAX_LOCAL_BUCKETS:
                del buckets[next(iter(buckets))]
            return bucket.take()
        wait_ms = await _TAKE(
            ctx.redis, [ctx.keys.rate(ctx.service, spec.name, key)], [limit.rps, limit.burst]
        )
        return int(wait_ms) / 1000

    async def admit(call: Call, call_next: Next) -> Outcome:
        wait = await wait_for(call)
        if wait > 0:
            return call.fail(
                WireError.RATE_LIMITED,
                f"{call.method}() is limited to {limit.rps:g} calls/s ({limit.scope} scope); "
                f"retry after {wait:.3f} s",
                {"retry_after": wait},
            )
        return await call_next(call)

    return admit
