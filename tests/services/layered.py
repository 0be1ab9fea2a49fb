"""A test service whose methods stack features: which layers see a cache hit and a refusal."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from titan_broker import cache, metric, process, public, rate_limit, trace


def _record_spans(path: str) -> None:
    """Append each finished span's name and status to ``path`` (one JSON object a line)."""
    from opentelemetry import trace as otel
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Recorder(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with open(path, "a") as f:
                f.writelines(
                    json.dumps({"name": s.name, "status": s.status.status_code.name}) + "\n" for s in spans
                )
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Recorder()))
    otel.set_tracer_provider(provider)


@process(name="layered", version="0.1.0")
class Layered:
    async def init(self, spans: str) -> None:
        _record_spans(spans)
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
