"""Configuration as small frozen value objects; durations are seconds as floats."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from ._errors import ConfigError
from ._wire.keys import check_name as check_name
from ._wire.protocol import DEFAULT_MAX_PAYLOAD

ENV_URL = "TITAN_REDIS_URL"
ENV_NAMESPACE = "TITAN_NAMESPACE"
DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_NAMESPACE = "titan"


def resolve_url(url: str | None) -> str:
    """The Redis URL to use: the one given, else $TITAN_REDIS_URL, else redis://localhost:6379/0."""
    url = url or os.environ.get(ENV_URL) or DEFAULT_URL
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix", "redis+sentinel", "redis+sentinels"):
        raise ConfigError(
            f"Redis URL {redact(url)!r} must start with redis://, rediss://, unix:// "
            "or redis+sentinel:// (see the README: Redis Cluster and Sentinel)"
        )
    tls_options(url)
    return url


def url_user(url: str) -> str | None:
    """The ACL user a connection to ``url`` logs in as, when the URL names one (``user:pass@``, or
    ``?username=`` as redis-py reads it too); None: the ``default`` user."""
    parts = urlsplit(url)
    if parts.username:
        return unquote(parts.username)
    return dict(parse_qsl(parts.query)).get("username") or None


_TLS_INSTEAD = {"redis": "rediss", "redis+sentinel": "redis+sentinels"}
"""The scheme with TLS for each scheme without it (a unix socket has none)."""


def tls_options(url: str) -> dict[str, str]:
    """The ``ssl_*`` options in the query of ``url``; ConfigError when its scheme has no TLS.

    redis-py would pass them to a plain connection, which takes no TLS option
    (a TypeError deep in its connection pool).
    """
    parts = urlsplit(url)
    options = {k: v for k, v in parse_qsl(parts.query) if k.startswith("ssl_")}
    if options and parts.scheme not in ("rediss", "redis+sentinels"):
        instead = _TLS_INSTEAD.get(parts.scheme)
        fix = f"use {instead}://" if instead else "a unix socket has no TLS: remove them"
        raise ConfigError(
            f"Redis URL {redact(url)!r} has TLS options ({', '.join(sorted(options))}) but "
            f"{parts.scheme}:// does not use TLS: {fix}"
        )
    return options


def resolve_namespace(namespace: str | None) -> str:
    """The namespace to use: the one given, else $TITAN_NAMESPACE, else 'titan'."""
    ns = namespace or os.environ.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE
    return check_name(ns, "namespace")


LONGEST = 315_360_000.0
"""Seconds: ten years, the longest delay, deadline or result_ttl (a job's ttl field has 12 digits)."""


def check_seconds(what: str, value: float, *, at_least: float = 0.001) -> float:
    """``value`` when it is a number of seconds from ``at_least`` to ten years; else ConfigError."""
    # A bool is an int to Python, but delay=True is a mistake, not a one-second delay.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not at_least <= value <= LONGEST
    ):
        raise ConfigError(
            f"{what} must be a number of seconds from {at_least:g} to {LONGEST:g} (ten years), got {value!r}"
        )
    return float(value)


_QUERY_PASSWORD = re.compile(r"(?i)(^|&)([^=&]*password=)[^&]*")


def redact(url: str) -> str:
    """The URL with its passwords replaced by '***', for messages and logs.

    Every place a password can be is covered: the userinfo
    (``redis://user:pass@host``) and any query parameter whose name ends in
    ``password`` (``?password=``, ``?sentinel_password=``). The hosts are kept
    as written, a sentinel URL's list of them included.
    """
    base, mark, query = url.partition("?")
    url = base + mark + _QUERY_PASSWORD.sub(r"\1\2***", query)
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker serves its stream."""

    concurrency: int = 16
    """Calls run at once; the worker reads no more entries than it has free slots."""
    heartbeat_interval: float = 1.0
    """Also how often the worker looks for calls left pending by dead workers."""
    heartbeat_ttl: float = 5.0
    """The registry record expires this long after the last heartbeat."""
    grace_period: float = 30.0
    """On shutdown, how long calls in flight may take to finish."""
    read_block: float = 1.0
    """How long one XREADGROUP blocks; also bounds how fast a drain stops reading."""
    max_payload: int = DEFAULT_MAX_PAYLOAD
    reply_ttl: float = 300.0
    """A reply stream nobody reads expires this long after the last reply written to it."""
    max_deliveries: int | None = None
    """Overrides the service's @process(max_deliveries=...) when set."""
    health_interval: float = 5.0
    """How often the @health_check runs."""
    health_timeout: float = 2.0
    """A health check slower than this counts as unhealthy."""
    metrics_port: int | None = None
    """Serve Prometheus metrics over HTTP on this port (0 picks a free one)."""
    parent_pid: int | None = None
    """When set, the worker drains and exits once this process (its manager) is gone."""
    dead_letter_maxlen: int = 10_000
    """The dead-letter stream keeps about this many entries (oldest trimmed first)."""
    expose_tracebacks: bool = False
    """Send the traceback of a failed call to its caller (for development); by default the caller
    gets the error's type, message and id, and the worker logs the traceback under that id."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.heartbeat_interval <= 0 or self.heartbeat_ttl <= self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_ttl ({self.heartbeat_ttl}) must exceed heartbeat_interval "
                f"({self.heartbeat_interval}), and both be positive"
            )
        if self.grace_period < 0 or self.read_block <= 0:
            raise ConfigError("grace_period must be >= 0 and read_block > 0")
