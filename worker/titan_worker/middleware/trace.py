"""@trace: an OpenTelemetry server span around the call, a child of the caller's span.

The caller's context arrives as a W3C ``traceparent`` (request field ``t``).
With only opentelemetry-api installed the tracer is a no-op.
"""

from __future__ import annotations

from titan_broker._service import MethodSpec, TraceOptions

from ..call import Call, Middleware, Next, Outcome
from ..context import WorkerContext

FEATURE = TraceOptions.feature


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware | None:
    if spec.trace is None:
        return None
    # Imported by the services that trace only: a worker without @trace never loads OpenTelemetry.
    from opentelemetry import propagate
    from opentelemetry import trace as otel

    tracer = otel.get_tracer("titan_broker.worker")
    name = spec.trace.name or f"{ctx.service}.{spec.name}"
    attributes = {
        "rpc.system": "titan",
        "rpc.service": ctx.service,
        "rpc.method": spec.name,
        "titan.worker": ctx.worker_id,
    }

    async def traced(call: Call, call_next: Next) -> Outcome:
        traceparent = call.request.trace
        parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
        with tracer.start_as_current_span(
            name, context=parent, kind=otel.SpanKind.SERVER, attributes=attributes
        ) as span:
            outcome = await call_next(call)
            if not outcome.ok:
                span.set_status(otel.Status(otel.StatusCode.ERROR))
            return outcome

    return traced
