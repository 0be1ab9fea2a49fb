"""The call middleware chain: a feature sees what it wraps, whatever the order of the decorators.

Cache hits are counted by @metric and traced by @trace; a rate-limit refusal is traced and counted
as an error. (Before the chain, a hit returned before either ran and a refusal left no span.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from titan_broker import ProcessManager, RateLimited

from .conftest import SERVICES, eventually

pytestmark = pytest.mark.anyio
LAYERED = SERVICES / "layered.py"


async def spans_of(path: Path, name: str, count: int) -> list[dict[str, str]]:
    file = anyio.Path(path)

    async def found() -> list[dict[str, str]] | None:
        text = await file.read_text() if await file.exists() else ""
        rows = [json.loads(line) for line in text.splitlines()]
        mine = [r for r in rows if r["name"] == name]
        return mine if len(mine) >= count else None

    spans: list[dict[str, str]] = await eventually(found, 10, f"{count} span(s) of {name}")
    return spans


async def metrics_of(pm: ProcessManager, method: str, calls: int) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        for worker in await pm.workers_of("layered"):
            summary = worker.metrics.get(method)
            if summary and summary["calls"] >= calls:
                return dict(summary)
        return None

    summary: dict[str, Any] = await eventually(found, 10, f"{calls} call(s) of {method} in the metrics")
    return summary


async def test_a_cache_hit_is_counted_by_metric_and_traced(pm: ProcessManager, tmp_path: Path) -> None:
    spans = tmp_path / "spans.jsonl"
    svc = await pm.spawn(LAYERED, dependencies={"spans": str(spans)})
    first = await svc.cached(21)
    second = await svc.cached(21)
    assert first == second == {"value": 42, "runs": 1, "pid": first["pid"]}  # the second was a hit
    assert [s["status"] for s in await spans_of(spans, "layered.cached", 2)] == ["UNSET", "UNSET"]
    summary = await metrics_of(pm, "cached", 2)
    assert summary["calls"] == 2 and summary["errors"] == 0


async def test_a_rate_limit_refusal_is_traced_and_counted_as_an_error(
    pm: ProcessManager, tmp_path: Path
) -> None:
    spans = tmp_path / "spans.jsonl"
    svc = await pm.spawn(LAYERED, dependencies={"spans": str(spans)})
    assert await svc.limited() == "ok"
    with pytest.raises(RateLimited):
        await svc.limited()  # one token, refilled every 100 s
    assert [s["status"] for s in await spans_of(spans, "layered.limited", 2)] == ["UNSET", "ERROR"]
    summary = await metrics_of(pm, "limited", 2)
    assert summary["calls"] == 2 and summary["errors"] == 1
