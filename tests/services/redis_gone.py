"""A test service whose init() shuts its Redis down: the worker loses Redis while it starts."""

import redis

from titan_broker import process, public


@process(name="redis-gone")
class RedisGone:
    async def init(self, url: str = "") -> None:
        client = redis.Redis.from_url(url)
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it goes
        finally:
            client.close()

    @public
    async def ping(self) -> str:
        return "pong"
