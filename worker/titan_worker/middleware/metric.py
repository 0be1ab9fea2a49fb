"""@metric: count, time and count the errors of every call the method gets, hits and refusals too."""

from __future__ import annotations

import time

from titan_broker._service import MethodSpec, MetricOptions

from ..call import Call, Middleware, Next, Outcome
from ..context import WorkerContext

FEATURE = MetricOptions.feature


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware | None:
    if spec.metric is None:
        return None
    name = spec.metric.name or spec.name

    async def measured(call: Call, call_next: Next) -> Outcome:
        started = time.perf_counter()
        outcome = await call_next(call)
        ctx.metrics.observe(name, time.perf_counter() - started, outcome.ok)
        return outcome

    return measured
