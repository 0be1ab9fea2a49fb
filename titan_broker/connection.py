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


class Channel:
    """One connection of its own for a hot path: commands go straight to the socket.

    No pool to acquire from, no retry wrapper, no response callbacks: replies
    come back as RESP2 values (bytes, ints, lists; nil as None). That saves
    about a quarter of redis-py's per-command cost. An error reply raises
    ResponseError and leaves the connection usable; any other failure
    (including cancellation mid-command) drops the connection, and the next
    command reconnects. The owner handles retries.
    """

    def __init__(self, client: Redis) -> None:
        self._client = client

    @classmethod
    async def open(cls, url: str) -> Channel:
        """Connect; raise RedisUnavailable like open_redis."""
        client = aioredis.Redis.from_url(
            url, decode_responses=False, single_connection_client=True, protocol=2
        )
        try:
            await client.initialize()
            assert client.connection is not None
            await client.connection.connect()  # type: ignore[no-untyped-call]
        except BaseException as exc:
            await client.aclose()
            if isinstance(exc, CONNECTION_ERRORS):
                raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {exc}") from exc
            raise
        return cls(client)

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply."""
        conn = self._client.connection
        assert conn is not None, "channel is closed"
        try:
            await conn.send_packed_command(conn.pack_command(*args), check_health=False)
            return await conn.read_response()
        except rexc.ResponseError:
            raise
        except BaseException:
            await conn.disconnect(nowait=True)
            raise

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one write; return their replies in order, errors as values."""
        conn = self._client.connection
        assert conn is not None, "channel is closed"
        results: list[Any] = []
        try:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            for _ in commands:
                try:
                    results.append(await conn.read_response())
                except rexc.ResponseError as exc:
                    results.append(exc)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return results

    async def aclose(self) -> None:
        await self._client.aclose()


class AutoPipeline:
    """Sends commands over one channel, batching the ones issued at the same time.

    When no send is in flight a command goes out alone; commands issued while
    one is in flight are sent together, in one write, when it returns. Each
    command keeps its own result or error (no transaction across the batch).
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
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
                results: list[Any] = []
                try:
                    results.append(await self._channel.execute(*batch[0][0]))
                except rexc.ResponseError as exc:
                    results.append(exc)
            else:
                results = await self._channel.execute_many([args for args, _ in batch])
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


def stream_entries(reply: Any) -> list[tuple[bytes, bytes, dict[bytes, bytes]]]:
    """(stream, entry id, fields) of each entry in a raw RESP2 XREAD/XREADGROUP reply (nil: none)."""
    if not reply:
        return []
    return [
        (stream, entry_id, dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {})
        for stream, entries in reply
        for entry_id, fields in entries
    ]
