"""Every call: its arguments are bound to the method's signature and decoded into the parameters'
annotations (``titan_broker._wire.values``) before anything runs; a call whose arguments do not fit is
answered with titan.BadArguments and never runs."""

from __future__ import annotations

from titan_broker._errors import WireError
from titan_broker._service import MethodSpec

from ..call import Call, Middleware, Next, Outcome
from ..context import WorkerContext

FEATURE = None  # always on


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware:
    parameters = spec.parameters

    async def decode(call: Call, call_next: Next) -> Outcome:
        # In place: the layers after this one (rate-limit and cache keys) and the method see the
        # decoded values, and the request is this call's own.
        problem = parameters.decode(call.method, call.request.args, call.request.kwargs)
        if problem is not None:
            return call.fail(WireError.BAD_ARGUMENTS, problem)
        return await call_next(call)

    return decode
