"""Internal: the Redis transport. What runs behind a URL (``topology``: one Redis, a cluster, a
Sentinel-managed primary), connections that follow it (``connection``), the Lua scripts (``scripting``
and ``lua/``), and the one retry-delay policy (``backoff``)."""

from .backoff import Backoff as Backoff
from .connection import CONNECTION_ERRORS as CONNECTION_ERRORS
from .connection import REDIS_ERRORS as REDIS_ERRORS
from .connection import SOCKET_TIMEOUT as SOCKET_TIMEOUT
from .connection import AutoPipeline as AutoPipeline
from .connection import Channel as Channel
from .connection import Redis as Redis
from .connection import open_redis as open_redis
from .connection import stream_entries as stream_entries
from .connection import text as text
from .connection import titan_error as titan_error
from .denied import Acting as Acting
from .denied import access_denied as access_denied
from .denied import acting as acting
from .denied import is_denied as is_denied
from .scripting import Batch as Batch
from .scripting import Script as Script
from .topology import Topology as Topology
from .topology import discover as discover

__all__ = (
    "CONNECTION_ERRORS",
    "REDIS_ERRORS",
    "SOCKET_TIMEOUT",
    "Acting",
    "AutoPipeline",
    "Backoff",
    "Batch",
    "Channel",
    "Redis",
    "Script",
    "Topology",
    "access_denied",
    "acting",
    "discover",
    "is_denied",
    "open_redis",
    "stream_entries",
    "text",
    "titan_error",
)
