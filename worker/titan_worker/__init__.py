"""The titan-worker command and the worker runtime that serves a service's stream."""

from titan_broker._redis_import import import_redis

import_redis()  # first: the modules below import redis-py, which is imported without what it does not use

from .worker import Worker as Worker  # noqa: E402

__all__ = ("Worker",)
