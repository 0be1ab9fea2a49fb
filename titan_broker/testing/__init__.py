"""Helpers for testing services: run a service in the test's own process (``serve``), a Redis for
tests (``local_redis_url``; private servers: one node, a cluster, sentinels), and a pytest plugin
(loaded by itself: fixtures ``titan_redis_url``, ``titan_namespace``, ``titan_client``,
``titan_manager``). See docs/testing.md."""

from ._local_cluster import LocalCluster as LocalCluster
from ._local_redis import LocalRedis as LocalRedis
from ._local_sentinel import LocalSentinel as LocalSentinel
from ._serve import Served as Served
from ._serve import serve as serve
from ._serve import served as served
from ._shared_redis import local_redis_url as local_redis_url

__all__ = ("LocalCluster", "LocalRedis", "LocalSentinel", "Served", "local_redis_url", "serve", "served")
