"""Every call: dropped unrun when its deadline has passed, cancelled when it runs past it.

A plain ``def`` method runs in a thread, which cannot be interrupted: it
keeps its slot until it returns, and its result is then replaced by
DeadlineExceeded (the caller has given up). On shutdown past the grace
period its thread is abandoned, so it never holds the worker.
"""

from __future__ import annotations

import asyncio
from typing import Any

from titan_broker._errors import WireError
from titan_broker._service import MethodSpec

from ..call import Call, Middleware, Next, Outcome
from ..context import WorkerContext

FEATURE = None  # always on


class _Expiry:
    """Cancels a call's task when its deadline passes, and remembers that it did."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def fire(self) -> None:
        if not self.task.done():
            self.fired = True
            self.task.cancel()


class _Loop:
    """The event loop a method's calls run on (a chain serves one run of a worker), looked up at the
    first call: on Python 3.11 each look-up costs a getpid() system call."""

    __slots__ = ("loop",)

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        return loop


def build(spec: MethodSpec, ctx: WorkerContext) -> Middleware:
    running = _Loop()

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
        # A timer that cancels this task at the deadline: asyncio.timeout_at's own logic (the task's
        # cancel count tells a cancellation of ours from one from outside) without its object and
        # context manager, a third of its cost on every call. At the deadline itself
        # (time.monotonic(), asyncio's clock), not "remaining" from the loop's time: uvloop's time is
        # the one of the loop's last turn, so that would fire early.
        loop = running.get()
        task = asyncio.current_task(loop)
        assert task is not None, "a call runs in a task"
        cancelling = task.cancelling()
        expiry = _Expiry(task)
        handle = loop.call_at(call.deadline, expiry.fire)
        try:
            return await call_next(call)
        except asyncio.CancelledError:
            if not expiry.fired:
                raise
            expiry.fired = False
            if task.uncancel() > cancelling:
                raise  # cancelled from outside as well: that cancellation goes on
        finally:
            handle.cancel()
            if expiry.fired:  # the method ended otherwise after the cancel: take ours back
                task.uncancel()
        sent = f" after {call.items_sent} item(s)" if spec.streaming else ""
        return call.fail(
            WireError.DEADLINE_EXCEEDED, f"{call.method}() was cancelled{sent}: it ran past its deadline"
        )

    return bound
