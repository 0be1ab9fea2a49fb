"""What @cache, @rate_limit, @metric and @trace do when a worker runs a call.

Worker-scope state lives here, in the worker; service-scope state lives in
Redis under the service's hash tag and is changed by atomic scripts.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import propagate
from opentelemetry import trace as otel
from prometheus_client import CollectorRegistry, Counter, Histogram

from titan_broker import protocol
from titan_broker.decorators import CacheOptions, RateLimitOptions
from titan_broker.definition import MethodSpec
from titan_broker.stats import LatencyHistogram

_tracer = otel.get_tracer("titan_broker.worker")


def cache_key(options: CacheOptions | RateLimitOptions, args: list[Any], kwargs: dict[str, Any]) -> str:
    """The digest of a call's arguments, or of what the option's ``key`` function makes of them."""
    material = options.key(*args, **kwargs) if options.key is not None else [args, kwargs]
    return hashlib.blake2b(protocol.pack(material), digest_size=16).hexdigest()


@dataclass
class _Entry:
    value: Any
    expires: float
    generation: bytes


class LocalCache:
    """A TTL cache holding at most ``maxsize`` results, least recently used out first."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def get(self, key: str, generation: bytes) -> tuple[bool, Any]:
        entry = self._entries.get(key)
        if entry is None or entry.expires < time.monotonic() or entry.generation != generation:
            self._entries.pop(key, None)
            return False, None
        self._entries.move_to_end(key)
        return True, entry.value

    def put(self, key: str, value: Any, ttl: float, generation: bytes) -> None:
        self._entries[key] = _Entry(value, time.monotonic() + ttl, generation)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)


class LocalBucket:
    """A token bucket in this worker."""

    def __init__(self, rps: float, burst: int) -> None:
        self.rps = rps
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 when a token was taken, else the seconds until one is due."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rps)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rps


@dataclass
class MethodStats:
    calls: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class Metrics:
    """Prometheus metrics of the @metric methods, and a summary for the registry record."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.calls = Counter("titan_calls", "Calls served", ["service", "method"], registry=self.registry)
        self.errors = Counter(
            "titan_call_errors", "Calls that ended in an error", ["service", "method"], registry=self.registry
        )
        self.duration = Histogram(
            "titan_call_duration_seconds",
            "Time to serve a call",
            ["service", "method"],
            registry=self.registry,
        )
        self.stats: dict[str, MethodStats] = {}

    def observe(self, name: str, seconds: float, ok: bool) -> None:
        self.calls.labels(self.service, name).inc()
        self.duration.labels(self.service, name).observe(seconds)
        stats = self.stats.setdefault(name, MethodStats())
        stats.calls += 1
        stats.latency.observe(seconds)
        if not ok:
            self.errors.labels(self.service, name).inc()
            stats.errors += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"calls": s.calls, "errors": s.errors, **s.latency.summary()}
            for name, s in self.stats.items()
        }


@contextmanager
def traced(spec: MethodSpec, service: str, traceparent: str | None, worker_id: str) -> Iterator[otel.Span]:
    """An OpenTelemetry server span for the call, a child of the caller's span when it sent one."""
    assert spec.trace is not None
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    name = spec.trace.name or f"{service}.{spec.name}"
    attributes = {
        "rpc.system": "titan",
        "rpc.service": service,
        "rpc.method": spec.name,
        "titan.worker": worker_id,
    }
    with _tracer.start_as_current_span(
        name, context=parent, kind=otel.SpanKind.SERVER, attributes=attributes
    ) as span:
        yield span
