"""Opening Redis connections from a URL, with errors that say which server failed."""

from __future__ import annotations

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


async def server_version(client: Redis) -> tuple[int, ...]:
    """The Redis server version as a tuple of ints."""
    info = await client.info("server")
    raw = str(info.get("redis_version", "0"))
    return tuple(int(p) for p in raw.split(".") if p.isdigit())
