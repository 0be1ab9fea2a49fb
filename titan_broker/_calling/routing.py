"""What a client knows of a service's workers: where an affinity key goes, whether any worker lives,
over how many shards its calls spread, and whether its user is registered for it (its calls then go
to the user's own request streams).

The first two are read from the registry and trusted for ROUTE_TTL. Shortly before a
call's deadline the client checks, in the background, whether the service
has a live worker at all, so that its timeout error can say "no live worker"
without a round trip after the deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

import anyio
import anyio.abc

from .._errors import CallTimeout, NoLiveWorkers, RedisUnavailable
from .._redis.connection import REDIS_ERRORS, Redis, text, titan_error
from .._wire import protocol
from .._wire.keys import Keys, shard_scopes, shards_of

logger = logging.getLogger("titan_broker")

ROUTE_TTL = 1.0
"""Seconds a client trusts what it learnt of a service's workers (affinity routing, fail-fast)."""
SHARDS_TTL = 5.0
"""Seconds a client trusts the shard count it read for a service (then read again in the background)."""
PROBE_BUDGET = 1.0
"""Seconds the background check for live workers may take."""


def probe_margin(timeout: float) -> float:
    """How long before a call's deadline the client checks for live workers."""
    return min(0.25, timeout / 4)


class Shards:
    """Per service, the scopes of its shards as its workers registered them (the ``shards`` of its
    config hash), and which one the next call goes to: round-robin, so that a busy service's calls
    spread over the slots (and a cluster's primaries) it is sharded over. The calls made in one
    turn of the event loop go to the same shard, so that they still go out as one batch (one
    script call), as they would to a service of one shard.

    A service is read in the background at its first call (which goes to the first shard, as
    every call does until the count is known), then again every SHARDS_TTL: a client that read
    an older count sends to the shards that count names, which the workers of a service always
    read as long as the count is unchanged (changing it is a stop-and-drain).
    """

    def __init__(self, keys: Keys, redis: Callable[[], Redis]) -> None:
        self.keys = keys
        self._redis = redis
        self.user: str | None = None
        """The client's ACL user (None: a Redis without ACLs, where no user is registered)."""
        self._known: dict[str, tuple[float, list[str], bool]] = {}
        """service -> (event loop time to read it again, its shards' scopes, whether ``user`` is
        registered for it: its calls then go to the user's own request streams)."""
        self._turn: dict[str, int] = {}
        self._this_turn: dict[str, str] = {}
        """service -> the shard of the calls made in this turn of the event loop."""
        self._reading: set[str] = set()
        self.tg: anyio.abc.TaskGroup | None = None

    def known(self, service: str) -> list[str]:
        """The scopes of the service's shards as last read (its own only, until read)."""
        known = self._known.get(service)
        return known[1] if known is not None else [service]

    def user_for(self, service: str) -> str | None:
        """The client's user when it is registered for ``service`` (as last read), else None."""
        known = self._known.get(service)
        return self.user if known is not None and known[2] else None

    def unread(self, service: str) -> bool:
        """Whether ``ready`` has a read to wait for (a check cheap enough for every call)."""
        return self.user is not None and service not in self._known

    async def ready(self, service: str, deadline: float) -> None:
        """Read the service at the client's first call to it, by ``deadline`` (event loop time), when
        the client has a user: whether its calls go to the user's streams must be known before the
        first is sent (a rule without the shared stream refuses it). A read that fails or is late
        leaves it to the background reads (the shared stream until then)."""
        if not self.unread(service):
            return
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await self.read(service)

    def next_scope(self, service: str) -> str:
        """The scope of the shard for a new call (the service's own for one shard)."""
        known = self._known.get(service)
        if known is None or known[0] < anyio.current_time():
            self._read_soon(service)
        if known is None:
            return service
        scopes = known[1]
        if len(scopes) == 1:
            return scopes[0]
        scope = self._this_turn.get(service)
        if scope is None:
            turn = self._turn[service] = (self._turn.get(service, -1) + 1) % len(scopes)
            scope = self._this_turn[service] = scopes[turn]
            # Run at the next turn of the loop, after every task this turn resumes.
            asyncio.get_running_loop().call_soon(self._this_turn.pop, service, None)
        return scope

    async def read(self, service: str) -> None:
        """Read the service's shard count from the directory (one shard when not registered)."""
        registered: object = 0
        try:
            if self.user is None:
                raw = await self._redis().hget(self.keys.config(service), "shards")
            else:  # one round trip (both keys in the service's slot); a rule refusing the set: not registered
                async with self._redis().pipeline(transaction=False) as pipe:
                    pipe.hget(self.keys.config(service), "shards")
                    pipe.sismember(self.keys.users(service), self.user)
                    raw, registered = await pipe.execute(raise_on_error=False)
                if isinstance(raw, Exception):
                    raise raw
        except REDIS_ERRORS as exc:
            logger.debug("cannot read the shards of %r (%s); as before for now", service, exc)
            raw = None
            if service in self._known:
                return  # keep what was known
        shards = shards_of(raw)
        if len(self._known) > 4096:  # bounded whatever names callers use
            self._known.clear()
        scopes = shard_scopes(service, shards)
        self._known[service] = (anyio.current_time() + SHARDS_TTL, scopes, registered in (1, True))

    def _read_soon(self, service: str) -> None:
        if self.tg is None or service in self._reading:
            return
        self._reading.add(service)

        async def read() -> None:
            try:
                await self.read(service)
            finally:
                self._reading.discard(service)

        self.tg.start_soon(read)


class LiveWorkers:
    """Per service: the live workers of its affinity set, and how many workers live."""

    def __init__(self, keys: Keys, redis: Callable[[], Redis]) -> None:
        self.keys = keys
        self._redis = redis
        self._routes: dict[str, tuple[float, list[str]]] = {}
        self._live: dict[str, tuple[float, int]] = {}
        """service -> (event loop time of the check, live workers then)."""
        self._checking: set[str] = set()
        self.tg: anyio.abc.TaskGroup | None = None
        """Where background checks run (None: none are started)."""

    async def worker_for(self, service: str, method: str, key: str, deadline: float) -> str | None:
        """The live worker that ``key`` maps to (rendezvous hashing), or None when none is known."""
        now = anyio.current_time()
        cached = self._routes.get(service)
        if cached is None or cached[0] < now:
            cached = None
            with anyio.move_on_after(deadline - now):
                try:
                    redis = self._redis()
                    ids = sorted(text(w) for w in await redis.smembers(self.keys.affinity(service)))
                    async with redis.pipeline(transaction=False) as pipe:
                        for wid in ids:
                            pipe.exists(self.keys.worker(service, wid))
                        alive = await pipe.execute()
                except REDIS_ERRORS as exc:
                    raise titan_error(exc, f"route {service}.{method}()") from exc
                cached = (anyio.current_time() + ROUTE_TTL, [w for w, a in zip(ids, alive, strict=True) if a])
                self._routes[service] = cached
            if cached is None:
                raise RedisUnavailable(f"cannot route {service}.{method}(): Redis did not answer in time")
        workers = cached[1]
        if not workers:
            return None
        return max(
            workers, key=lambda wid: hashlib.blake2b(f"{key}\x00{wid}".encode(), digest_size=8).digest()
        )

    async def require_worker(self, service: str, method: str, deadline: float) -> None:
        """Raise NoLiveWorkers at once unless a worker of ``service`` lives (``wait_for_worker=False``)."""
        now = anyio.current_time()
        live = self._live.get(service)
        if live is not None and live[1] > 0 and now - live[0] < ROUTE_TTL:
            return
        count = None
        with anyio.move_on_after(deadline - now):
            try:
                count = await self.count_live(service)
            except REDIS_ERRORS as exc:
                raise titan_error(
                    exc,
                    f"check the workers of {service!r}",
                    command="SMEMBERS",
                    key=self.keys.workers(service),
                ) from exc
        if count is None:
            raise RedisUnavailable(f"cannot check the workers of {service!r}: Redis did not answer in time")
        if count == 0:
            raise NoLiveWorkers(
                f"{service}.{method}() was not sent: service {service!r} has no live worker "
                "(wait_for_worker=False; start one with 'titan-worker run FILE')"
            )

    def probe(self, fut: asyncio.Future[protocol.Reply] | None, service: str) -> None:
        """A timer callback: unless ``fut`` is answered, count the live workers in the background."""
        if (fut is not None and fut.done()) or service in self._checking or self.tg is None:
            return
        self._checking.add(service)
        self.tg.start_soon(self._probe, service)

    async def _probe(self, service: str) -> None:
        try:
            with anyio.move_on_after(PROBE_BUDGET):
                await self.count_live(service)
        except REDIS_ERRORS:
            pass
        finally:
            self._checking.discard(service)

    def timeout_error(self, service: str, method: str, timeout: float, started: float) -> CallTimeout:
        """CallTimeout, or NoLiveWorkers when a check made since ``started`` found none alive."""
        live = self._live.get(service)
        if live is not None and live[0] >= started and live[1] == 0:
            return NoLiveWorkers(
                f"{service}.{method}() got no answer within {timeout:g} s: "
                f"service {service!r} has no live worker (start one with 'titan-worker run FILE')"
            )
        return CallTimeout(f"{service}.{method}() got no answer within {timeout:g} s")

    async def count_live(self, service: str) -> int:
        """How many workers of ``service`` have a live record; raises redis-py errors."""
        redis = self._redis()
        ids = await redis.smembers(self.keys.workers(service))
        found: list[int] = []
        if ids:
            async with redis.pipeline(transaction=False) as pipe:
                for wid in ids:
                    pipe.exists(self.keys.worker(service, text(wid)))
                found = await pipe.execute()
        count = sum(int(x) for x in found)
        self._live[service] = (anyio.current_time(), count)
        return count
