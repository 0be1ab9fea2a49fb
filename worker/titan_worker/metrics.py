"""The numbers of the @metric methods: Prometheus metrics, and a summary for the registry record."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from titan_broker._registry import LatencyHistogram

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


@dataclass
class MethodStats:
    calls: int = 0
    errors: int = 0
    retries: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class Metrics:
    """Prometheus metrics of the @metric methods, and a summary for the registry record."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.stats: dict[str, MethodStats] = {}

    @functools.cached_property
    def prometheus(self) -> _Prometheus:
        """The Prometheus metrics, made (and prometheus-client imported) at the first use: a worker
        without @metric, @retry or a metrics port never loads it."""
        return _Prometheus()

    @property
    def registry(self) -> CollectorRegistry:
        return self.prometheus.registry

    def observe(self, name: str, seconds: float, ok: bool) -> None:
        prometheus = self.prometheus
        prometheus.calls.labels(self.service, name).inc()
        prometheus.duration.labels(self.service, name).observe(seconds)
        stats = self.stats.setdefault(name, MethodStats())
        stats.calls += 1
        stats.latency.observe(seconds)
        if not ok:
            prometheus.errors.labels(self.service, name).inc()
            stats.errors += 1

    def retried(self, name: str) -> None:
        """A run of ``name`` failed and goes back to the queue (@retry); counted with or without @metric."""
        self.prometheus.retries.labels(self.service, name).inc()
        self.stats.setdefault(name, MethodStats()).retries += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"calls": s.calls, "errors": s.errors, "retries": s.retries, **s.latency.summary()}
            for name, s in self.stats.items()
        }


class _Prometheus:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        labels, registry = ["service", "method"], self.registry
        self.calls = Counter("titan_calls", "Calls served", labels, registry=registry)
        self.errors = Counter("titan_call_errors", "Calls that ended in an error", labels, registry=registry)
        self.duration = Histogram(
            "titan_call_duration_seconds", "Time to serve a call", labels, registry=registry
        )
        self.retries = Counter(
            "titan_call_retries", "Runs that failed and were queued again (@retry)", labels, registry=registry
        )
