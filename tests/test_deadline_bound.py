"""The deadline layer around an async method, on its own: it cancels the call at its deadline, and
leaves the task it runs in (a worker's long-lived slot) as it found it, whatever the method does
with the cancellation or whoever else cancels the task."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from titan_worker.call import Call, Entry, Outcome, Reply
from titan_worker.context import WorkerContext
from titan_worker.middleware import deadline

from titan_broker._errors import WireError
from titan_broker._service import MethodSpec
from titan_broker._wire import protocol


async def _method() -> int:
    return 0


SPEC = MethodSpec("m", inspect.signature(_method), is_async=True)


def _call(seconds: float) -> Call:
    request = protocol.Request("c-1", "m", [], {}, "ns:{s}:reply:x", 0)
    return Call(Entry("s", b"1-0", {}), request, SPEC, "w-1", time.monotonic() + seconds, 1 << 20)


def _bound(method: Callable[[Call], Awaitable[Outcome]]) -> Callable[[Call], Awaitable[Outcome]]:
    layer = deadline.build(SPEC, cast(WorkerContext, None))
    return lambda call: layer(call, method)


def _ok(call: Call) -> Reply:
    return call.ok(1)


def test_a_call_past_its_deadline_is_cancelled_and_its_task_left_uncancelled() -> None:
    async def slow(call: Call) -> Outcome:
        await asyncio.sleep(30)
        return _ok(call)

    async def main() -> tuple[Outcome, int]:
        outcome = await asyncio.wait_for(_bound(slow)(_call(0.05)), 5)
        task = asyncio.current_task()
        assert task is not None
        return outcome, task.cancelling()

    async def in_task() -> tuple[Outcome, int]:
        return await asyncio.create_task(main())

    outcome, cancelling = asyncio.run(in_task())
    assert isinstance(outcome, Reply) and not outcome.ok
    assert protocol.unpack(cast(bytes, outcome.payload))["e"]["type"] == WireError.DEADLINE_EXCEEDED
    assert cancelling == 0


def test_a_method_that_swallows_the_cancel_keeps_its_outcome_and_the_task_is_not_left_cancelled() -> None:
    async def stubborn(call: Call) -> Outcome:
        with contextlib.suppress(asyncio.CancelledError):  # a method that will not be cancelled
            await asyncio.sleep(30)
        return _ok(call)

    async def main() -> tuple[Outcome, int, bool]:
        outcome = await _bound(stubborn)(_call(0.05))
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0.01)  # a later await in the same task is not cancelled
        return outcome, task.cancelling(), True

    outcome, cancelling, went_on = asyncio.run(main())
    assert isinstance(outcome, Reply) and outcome.ok
    assert cancelling == 0 and went_on


def test_a_cancellation_from_outside_goes_on_and_the_timer_is_disarmed() -> None:
    async def main() -> bool:
        running = asyncio.Event()

        async def slow(call: Call) -> Outcome:
            running.set()
            await asyncio.sleep(30)
            return _ok(call)

        task = asyncio.create_task(_bound(slow)(_call(0.2)))
        await running.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # past the deadline: a timer left armed would fire (into a done task)
        return task.cancelled()

    assert asyncio.run(main()) is True


def test_a_quick_call_is_answered_and_leaves_no_timer() -> None:
    async def answer(call: Call) -> Outcome:
        return _ok(call)

    async def main() -> tuple[Outcome, int]:
        outcome = await _bound(answer)(_call(30))
        loop = asyncio.get_running_loop()
        return outcome, sum(1 for h in cast(Any, loop)._scheduled if not h.cancelled())

    outcome, armed = asyncio.run(main())
    assert isinstance(outcome, Reply) and outcome.ok
    assert armed == 0
