"""Internal: the Redis transport. What runs behind a URL (``topology``: one Redis, a cluster, a
Sentinel-managed primary), connections that follow it (``connection``), the Lua scripts (``scripting``
and ``lua/``), and the one retry-delay policy (``backoff``)."""

from .backoff import Backoff as Backoff
from .connection import CONNECTION_ERRORS as CONNECTION_ERRORS
from .connection import SOCKET_TIMEOUT as SOCKET_TIMEOUT
from .connection import AutoPipeline as AutoPipeline
from .connection import Channel as Channel
from .connection import Redis as Redis
from .connection import open_redis as open_redis
from .connection import stream_entries as stream_entries
from .connection import text as text
from .scripting import Batch as Batch
from .scripting import Script as Script
from .topology import Topology as Topology
from .topology import discover as discover

__all__ = (
    "CONNECTION_ERRORS",
    "SOCKET_TIMEOUT",
    "AutoPipeline",
    "Backoff",
    "Batch",
    "Channel",
    "Redis",
    "Script",
    "Topology",
    "discover",
    "open_redis",
    "stream_entries",
    "text",
)
