"""Every call: dropped unrun when its deadline has passed, cancelled when it runs past it.

A plain ``def`` method runs in a thread, which cannot be interrupted: it
keeps its slot until it returns, and its result is then replaced by
DeadlineExceeded (the caller has given up). On shutdown past the grace
period its thread is abandoned, so it never holds the worker.
"""

from __future__ import annotations

import asyncio

from titan_broker._errors import WireError
from titan_broker._service import MethodSpec

from ..call import Call, Middleware, Next, Outcome
from ..context import WorkerContext

FEATURE = None  # always on


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware:
    async def bound(call: Call, call_next: Next) -> Outcome:
        remaining = call.remaining()
        if remaining <= 0:
            return call.fail(
                WireError.DEADLINE_EXCEEDED,
                f"{call.method}() was dropped unrun: its deadline passed {-remaining:.3f} s "
                "before it started",
            )
        if not spec.is_async and not spec.streaming:
            outcome = await call_next(call)
            if call.remaining() < 0:
                return call.fail(WireError.DEADLINE_EXCEEDED,
                                 f"{call.method}() finished {-call.remaining():.3f} s after its deadline; "
                                 "its result was dropped")  # fmt: skip
            return outcome
        # asyncio's own timeout: a fraction of the cost of a cancel scope, on every call. At the
        # deadline itself (time.monotonic(), asyncio's clock), not "remaining" from the loop's time:
        # uvloop's time is the one of the loop's last turn, so that would fire early.
        timeout = asyncio.timeout_at(call.deadline)
        try:
            async with timeout:
                return await call_next(call)
        except TimeoutError:
            if not timeout.expired():
                raise
        sent = f" after {call.items_sent} item(s)" if spec.streaming else ""
        return call.fail(
            WireError.DEADLINE_EXCEEDED, f"{call.method}() was cancelled{sent}: it ran past its deadline"
        )

    return bound
