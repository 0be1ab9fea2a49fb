"""A test service for @cache, @rate_limit, @metric, @trace and sync methods."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from titan_broker import cache, metric, process, public, rate_limit, trace


def _span_file_exporter(path: str) -> None:
    """Send this worker's finished spans to a JSON-lines file the test reads."""
    from opentelemetry import trace as otel
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class FileExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with open(path, "a") as f:
                for span in spans:
                    ctx = span.get_span_context()
                    assert ctx is not None
                    row = {
                        "name": span.name,
                        "trace_id": ctx.trace_id,
                        "span_id": ctx.span_id,
                        "parent_id": span.parent.span_id if span.parent else None,
                        "kind": span.kind.name,
                        "status": span.status.status_code.name,
                    }
                    f.write(json.dumps(row) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    otel.set_tracer_provider(provider)


@process(name="decorated", version="0.1.0")
class Decorated:
    async def init(self, store: str | None = None, spans: str | None = None, runs: str | None = None) -> None:
        self.runs: Counter[str] = Counter()
        self.store = Path(store) if store else None
        self.run_log = Path(runs) if runs else None
        """Where get_user notes each run ("get_user <pid>"), for tests with several workers."""
        if spans:
            _span_file_exporter(spans)

    @public
    @cache(ttl=0.5)
    async def square(self, x: int) -> dict[str, int]:
        self.runs["square"] += 1
        return {"value": x * x, "pid": os.getpid()}

    @public
    @cache(ttl=30, scope="service")
    async def shared(self, x: int) -> dict[str, int]:
        self.runs["shared"] += 1
        return {"value": x + 1, "pid": os.getpid()}

    @cache(ttl=30, invalidated_by=["update_user", "delete_user"])  # above @public: order is free
    @public
    async def get_user(self, uid: int) -> dict[str, Any] | None:
        self.runs["get_user"] += 1
        if self.run_log is not None:
            with self.run_log.open("a") as f:
                f.write(f"get_user {os.getpid()}\n")
        return self._users().get(str(uid))

    @public
    async def update_user(self, uid: int, name: str) -> None:
        users = self._users()
        users[str(uid)] = {"id": uid, "name": name}
        assert self.store is not None
        self.store.write_text(json.dumps(users))

    @public
    async def delete_user(self, uid: int) -> None:
        users = self._users()
        users.pop(str(uid), None)
        assert self.store is not None
        self.store.write_text(json.dumps(users))

    def _users(self) -> dict[str, Any]:
        if self.store is None or not self.store.exists():
            return {}
        return dict(json.loads(self.store.read_text()))

    @public
    @cache(ttl=30)
    async def fails(self) -> int:
        self.runs["fails"] += 1
        raise ValueError(f"failure number {self.runs['fails']}")

    @public
    async def run_counts(self) -> dict[str, int]:
        return dict(self.runs)

    @public
    @rate_limit(rps=10, burst=1)
    async def limited(self) -> int:
        return os.getpid()

    @public
    @rate_limit(rps=2, burst=2, key=lambda user: user)
    async def per_user(self, user: str) -> str:
        return user

    @public
    @rate_limit(rps=5, burst=1, scope="worker")
    async def worker_limited(self) -> int:
        return os.getpid()

    @metric
    @public
    async def measured(self, fail: bool = False) -> str:
        if fail:
            raise RuntimeError("asked to fail")
        return "ok"

    @public
    @trace()
    async def traced(self) -> str:
        return "traced"

    @public
    @trace()
    async def trace_probe(self) -> dict[str, bool]:
        """What tracing costs here: is the span of this call recorded, is the SDK even loaded?"""
        from opentelemetry import trace as otel

        span = otel.get_current_span()
        return {"recording": span.is_recording(), "sdk_loaded": "opentelemetry.sdk" in sys.modules}

    @public
    async def slow_async(self, seconds: float) -> float:
        await anyio.sleep(seconds)
        return time.monotonic()

    @public
    def blocking(self, seconds: float) -> float:
        time.sleep(seconds)  # a blocking library call
        return time.monotonic()
