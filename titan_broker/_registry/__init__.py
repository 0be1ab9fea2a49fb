"""Internal: what a namespace holds, read from Redis by anyone (callers, the CLI, a dashboard). Workers and
services (``records``), health (``health``), dead letters (``dead_letters``) and the latency histogram
the workers publish (``latency``)."""

from .dead_letters import list_dead_letters as list_dead_letters
from .dead_letters import purge_dead_letters as purge_dead_letters
from .dead_letters import replay_dead_letters as replay_dead_letters
from .health import ServiceHealth as ServiceHealth
from .health import aggregate as aggregate
from .latency import LatencyHistogram as LatencyHistogram
from .overview import Overview as Overview
from .overview import RegistryReader as RegistryReader
from .overview import ServiceOverview as ServiceOverview
from .records import RETIRED_AFTER as RETIRED_AFTER
from .records import QueueInfo as QueueInfo
from .records import ServiceInfo as ServiceInfo
from .records import VersionInfo as VersionInfo
from .records import WorkerInfo as WorkerInfo
from .records import backlog as backlog
from .records import forget_service as forget_service
from .records import idle_since as idle_since
from .records import known_services as known_services
from .records import list_services as list_services
from .records import list_workers as list_workers
from .records import queue_info as queue_info
from .records import queued as queued
from .records import read_workers as read_workers
from .records import registered_users as registered_users
from .records import request_streams as request_streams
from .records import service_scopes as service_scopes
from .records import shard_count as shard_count
from .records import user_names as user_names

__all__ = (
    "RETIRED_AFTER",
    "LatencyHistogram",
    "Overview",
    "QueueInfo",
    "RegistryReader",
    "ServiceHealth",
    "ServiceInfo",
    "ServiceOverview",
    "VersionInfo",
    "WorkerInfo",
    "aggregate",
    "backlog",
    "forget_service",
    "idle_since",
    "known_services",
    "list_dead_letters",
    "list_services",
    "list_workers",
    "purge_dead_letters",
    "queue_info",
    "queued",
    "read_workers",
    "registered_users",
    "replay_dead_letters",
    "request_streams",
    "service_scopes",
    "shard_count",
    "user_names",
)
