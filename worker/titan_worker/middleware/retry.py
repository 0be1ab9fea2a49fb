"""@retry: a run that raised one of the listed exceptions is queued again for later, not answered.

The outcome becomes a ``Retry`` that keeps this run's error reply (a job shows it while it
waits): settlement puts the call in the service's delayed set, due
after the backoff, and acknowledges this run (retry.lua). No retry when the
attempts are spent or when the next run could not start before the call's
deadline: the caller then gets this run's error.
"""

from __future__ import annotations

import random
import time

from titan_broker._service import MethodSpec, RetryOptions

from ..call import Call, Middleware, Next, Outcome, Reply, Retry
from ..context import WorkerContext

FEATURE = RetryOptions.feature


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware | None:
    options = spec.retry
    if options is None:
        return None

    async def retried(call: Call, call_next: Next) -> Outcome:
        outcome = await call_next(call)
        attempt = call.request.attempt
        if (
            not isinstance(outcome, Reply)
            or outcome.ok
            or attempt >= options.attempts
            or not isinstance(call.exception, options.on)
        ):
            return outcome
        delay = options.delay(attempt, random.random())
        if time.monotonic() + delay >= call.deadline:
            return outcome  # the next run could not start in time
        ctx.metrics.retried(spec.name)
        return Retry(outcome, delay)

    return retried
