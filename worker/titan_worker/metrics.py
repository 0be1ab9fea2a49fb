"""The numbers of the @metric methods: Prometheus metrics, and a summary for the registry record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from titan_broker._registry import LatencyHistogram


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
        self.retries = Counter(
            "titan_call_retries", "Runs that failed and were queued again (@retry)", ["service", "method"],
            registry=self.registry,
        )  # fmt: skip
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

    def retried(self, name: str) -> None:
        """A run of ``name`` failed and goes back to the queue (@retry); counted with or without @metric."""
        self.retries.labels(self.service, name).inc()
        self.stats.setdefault(name, MethodStats()).retries += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"calls": s.calls, "errors": s.errors, "retries": s.retries, **s.latency.summary()}
            for name, s in self.stats.items()
        }
