"""Every call: its arguments are checked against the method's signature before anything runs."""

from __future__ import annotations

from titan_broker.arguments import check_arguments
from titan_broker.definition import MethodSpec
from titan_broker.errors import WireError

from ..call import Call, Middleware, Next, Outcome
from ..context import WorkerContext

FEATURE = None  # always on


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware:
    async def check(call: Call, call_next: Next) -> Outcome:
        problem = check_arguments(call.method, spec.signature, call.request.args, call.request.kwargs)
        if problem is not None:
            return call.fail(WireError.BAD_ARGUMENTS, problem)
        return await call_next(call)

    return check
