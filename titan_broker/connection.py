"""Opening Redis connections from a URL, with errors that say which server failed."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from .config import redact
from .errors import RedisUnavailable

Redis = aioredis.Redis

CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    OSError,
)


DEFAULT_MAX_CONNECTIONS = 64


async def open_redis(url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> Redis:
    """Connect to the Redis at ``url`` and check it answers.

    Passwords, ACL users (``redis://user:pass@host``), TLS (``rediss://``,
    with ``?ssl_ca_certs=...``) and the db number come from the URL.
    Commands beyond ``max_connections`` at once wait for a free connection
    rather than fail. Raises RedisUnavailable naming the server (password hidden).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, decode_responses=False, max_connections=max_connections, timeout=None, health_check_interval=30
    )
    client = aioredis.Redis.from_pool(pool)  # the client owns and closes the pool
    try:
        await client.ping()
    except rexc.AuthenticationError as exc:
        await client.aclose()
        raise RedisUnavailable(f"Redis at {redact(url)} refused the credentials: {exc}") from exc
    except rexc.ResponseError as exc:
        await client.aclose()
        raise RedisUnavailable(f"Redis at {redact(url)} refused the connection: {exc}") from exc
    except CONNECTION_ERRORS as exc:
        await client.aclose()
        raise RedisUnavailable(
            f"cannot reach Redis at {redact(url)}: {exc}; is it running? (set --redis or TITAN_REDIS_URL)"
        ) from exc
    return client


def text(value: bytes | str) -> str:
    """A Redis reply as str (clients here use decode_responses=False)."""
    return value.decode() if isinstance(value, bytes) else value


async def open_dedicated(url: str) -> Redis:
    """One connection of its own, for a hot path (no pool to acquire from on every command)."""
    client = aioredis.Redis.from_url(url, decode_responses=False, single_connection_client=True)
    try:
        await client.initialize()
    except BaseException:
        await client.aclose()
        raise
    return client


class AutoPipeline:
    """Sends commands over one dedicated connection, batching the ones issued at the same time.

    When no send is in flight a command goes out alone; commands issued while
    one is in flight are sent together, as one pipeline, when it returns. Each
    command keeps its own result or error (no transaction across the batch).
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._busy = False

    async def execute(self, *args: Any) -> Any:
        """Run one command and return its reply, raising its error."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, fut))
        if not self._busy:
            self._busy = True
            try:
                while self._queue:
                    batch, self._queue = self._queue, []
                    await self._send(batch)
            finally:
                self._busy = False
                # Cancelled while leading: whoever still waits must not wait forever.
                for _, waiting in self._queue:
                    if not waiting.done():
                        waiting.set_exception(RedisUnavailable("send interrupted before it was made"))
                self._queue.clear()
        return await fut

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:
                results: list[Any] = [await self._redis.execute_command(*batch[0][0])]  # type: ignore[no-untyped-call]
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for args, _ in batch:
                        pipe.execute_command(*args)
                    results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RedisUnavailable(str(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)
