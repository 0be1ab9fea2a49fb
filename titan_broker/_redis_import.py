"""Importing redis-py without the OpenTelemetry metrics SDK, which it imports but does not need.

redis-py 8 imports the SDK's ``MeterProvider`` when the SDK is installed, only to annotate a
method: its metrics, once a program turns them on (``redis.observability``), go through the
OpenTelemetry API to the provider the program set. The SDK (and psutil, which it imports) costs
every process that imports redis-py about 50 ms of start-up and 3 MiB of memory: a spawned worker
pays it before its first call. The worker's package calls ``import_redis`` before any of its
modules imports redis-py.
"""

from __future__ import annotations

import sys

_SDK_METRICS = "opentelemetry.sdk.metrics"


def import_redis() -> None:
    """Import redis-py with the OpenTelemetry metrics SDK kept out, unless either is imported already.

    Only redis-py's own import is affected: a program or a service that imports the SDK, before
    or after, gets it whole, and redis-py's metrics work as its documentation says.
    """
    if "redis" in sys.modules or _SDK_METRICS in sys.modules:
        return
    # A None entry makes this one import fail as if the SDK were not installed, which redis-py
    # expects (it is optional); the entry goes at once, so that later imports find the SDK.
    sys.modules[_SDK_METRICS] = None  # type: ignore[assignment]
    try:
        import redis  # noqa: F401
    finally:
        if sys.modules.get(_SDK_METRICS, ...) is None:
            del sys.modules[_SDK_METRICS]
