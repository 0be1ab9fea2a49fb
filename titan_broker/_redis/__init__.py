"""Internal: the Redis transport. What runs behind a URL (``topology``: one Redis, a cluster, a
Sentinel-managed primary), connections that follow it (``connection``), the Lua scripts (``scripting``
and ``lua/``), and the one retry-delay policy (``backoff``)."""
