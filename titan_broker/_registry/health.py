"""The health of a service across all its workers on all hosts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._service.decorators import HealthStatus
from .records import WorkerInfo


@dataclass(frozen=True)
class ServiceHealth:
    """``status`` is healthy when every live worker is, unhealthy when none is (or none lives)."""

    service: str
    status: HealthStatus
    workers: list[dict[str, Any]] = field(default_factory=list)
    """One entry per live worker: id, host, pid, status, checks, details, unhealthy_streak."""
    failed: int = 0
    """Local pool slots given up after too many crashes."""

    @property
    def healthy(self) -> int:
        return sum(1 for w in self.workers if w["status"] == HealthStatus.HEALTHY)

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "status": str(self.status),
            "healthy": self.healthy,
            "failed": self.failed,
            "workers": self.workers,
        }


def aggregate(service: str, workers: list[WorkerInfo], failed: int = 0) -> ServiceHealth:
    """Combine the latest health report of each worker."""
    rows = []
    for w in workers:
        report = w.health or {"status": "healthy", "checks": {}, "details": {"note": "no @health_check"}}
        rows.append(
            {
                "worker_id": w.worker_id,
                "host": w.host,
                "pid": w.pid,
                "status": HealthStatus(report.get("status", "unhealthy")),
                "checks": report.get("checks", {}),
                "details": report.get("details", {}),
                "unhealthy_streak": w.unhealthy_streak,
            }
        )
    statuses = [r["status"] for r in rows]
    if not rows or all(s == HealthStatus.UNHEALTHY for s in statuses):
        status = HealthStatus.UNHEALTHY
    elif failed or any(s != HealthStatus.HEALTHY for s in statuses):
        status = HealthStatus.DEGRADED
    else:
        status = HealthStatus.HEALTHY
    return ServiceHealth(service, status, rows, failed)
