"""@cache: a method's results per arguments, for ``ttl`` seconds, in the worker or in Redis.

Entries are stored under the method's generation (a counter in Redis); an
invalidation bumps it, so every worker's entries go stale at once. A cache
is an optimisation: when Redis fails in a lookup the call runs as a miss,
and when it fails in a store the result is still returned.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

from titan_broker._redis import Script
from titan_broker._service import CacheOptions, MethodSpec, RateLimitOptions
from titan_broker._wire import protocol

from ..call import Call, Middleware, Next, Outcome, Reply
from ..context import WorkerContext

FEATURE = CacheOptions.feature
_GET = Script("cache_get")


def cache_key(options: CacheOptions | RateLimitOptions, args: list[Any], kwargs: dict[str, Any]) -> str:
    """The digest of a call's arguments, or of what the option's ``key`` function makes of them."""
    material = options.key(*args, **kwargs) if options.key is not None else [args, kwargs]
    return hashlib.blake2b(protocol.pack(material), digest_size=16).hexdigest()


@dataclass
class _Entry:
    value: Any
    expires: float
    generation: bytes


class LocalCache:
    """A TTL cache holding at most ``maxsize`` results, least recently used out first."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, generation: bytes) -> tuple[bool, Any]:
        entry = self._entries.get(key)
        if entry is None or entry.expires < time.monotonic() or entry.generation != generation:
            self._entries.pop(key, None)
            return False, None
        self._entries.move_to_end(key)
        return True, entry.value

    def put(self, key: str, value: Any, ttl: float, generation: bytes) -> None:
        self._entries[key] = _Entry(value, time.monotonic() + ttl, generation)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware | None:
    options = spec.cache
    if options is None:
        return None
    gen_key = ctx.keys.cache_generation(ctx.service, spec.name)
    prefix = ctx.keys.cache_prefix(ctx.service, spec.name)
    local = LocalCache(options.maxsize) if options.scope == "worker" else None

    async def lookup(digest: str) -> tuple[bool, Any, bytes]:
        if local is not None:
            # The generation lives in Redis, so an invalidation holds in every worker at once.
            generation = cast(bytes, await ctx.redis.get(gen_key) or b"0")
            hit, value = local.get(digest, generation)
            return hit, value, generation
        generation, raw = await _GET(ctx.redis, [gen_key, prefix], [digest])
        return (raw is not None), (protocol.unpack(raw) if raw is not None else None), generation

    async def store(digest: str, value: Any, generation: bytes) -> None:
        if local is not None:
            local.put(digest, value, options.ttl, generation)
            return
        key = prefix + generation.decode() + ":" + digest
        await ctx.redis.set(key, protocol.pack(value), px=max(1, int(options.ttl * 1000)))

    async def cached(call: Call, call_next: Next) -> Outcome:
        digest = cache_key(options, call.request.args, call.request.kwargs)
        try:
            hit, value, generation = await lookup(digest)
        except Exception as exc:  # a cache that fails is a miss, never a failed call
            ctx.log.log(logging.WARNING, f"cache-get:{spec.name}",
                        "worker %s: cache lookup for %s() failed (%s); running it", ctx.worker_id,
                        spec.name, exc)  # fmt: skip
            hit, value, generation = False, None, None
        if hit:
            return call.ok(value)
        outcome = await call_next(call)
        if isinstance(outcome, Reply) and outcome.ok and generation is not None:
            try:
                await store(digest, outcome.value, generation)
            except Exception as exc:
                ctx.log.log(logging.WARNING, f"cache-put:{spec.name}",
                            "worker %s: could not cache a result of %s() (%s)", ctx.worker_id,
                            spec.name, exc)  # fmt: skip
        return outcome

    return cached
