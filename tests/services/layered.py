"""A test service whose methods stack features: which layers see a cache hit and a refusal."""

from __future__ import annotations

import os

from decorated import _span_file_exporter  # a neighbour: service files load with their folder on sys.path

from titan_broker import cache, metric, process, public, rate_limit, trace


@process(name="layered", version="0.1.0")
class Layered:
    async def init(self, spans: str) -> None:
        _span_file_exporter(spans)
        self.runs = 0

    @public
    @trace()
    @metric
    @cache(ttl=60)
    async def cached(self, x: int) -> dict[str, int]:
        self.runs += 1
        return {"value": x * 2, "runs": self.runs, "pid": os.getpid()}

    @public
    @metric
    @rate_limit(rps=0.01, burst=1, scope="worker")
    @trace()
    async def limited(self) -> str:
        return "ok"
