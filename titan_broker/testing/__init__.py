"""Helpers for testing services: private Redis servers (one node, a cluster, sentinels) started on free
ports and stopped on exit."""

from ._local_cluster import LocalCluster as LocalCluster
from ._local_redis import LocalRedis as LocalRedis
from ._local_sentinel import LocalSentinel as LocalSentinel

__all__ = ("LocalCluster", "LocalRedis", "LocalSentinel")
