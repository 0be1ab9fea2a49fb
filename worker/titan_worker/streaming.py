"""A streaming method's items sent to its caller, several to a message, within the caller's credit.

Two tasks share a buffer: the producer runs the async generator, checks and
encodes each item, and waits while the next item's position reaches the
caller's credit; the sender writes whatever the buffer holds in one script
call (as few messages as the size limit allows) and goes on as soon as it is
written, so items made while one write is in flight travel together in the
next. A window of credit spent, the producer waits on the call's wake list
(``BLPOP``), where the caller pushes each new credit as it grants it: credit
never waits on a poll. The control hash is read about every 0.2 s as well,
for ``cancel`` and for a credit whose token was missed.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio

from titan_broker._errors import EncodeError, WireError
from titan_broker._redis import REDIS_ERRORS, Script
from titan_broker._wire import Keys, protocol

from .call import Call, Outcome, Reply
from .context import WorkerContext

_STREAM_ITEMS = Script("stream_item")
POLL = 0.2
"""Seconds between reads of the control hash (``cancel``), and at most between looks at the credit."""

Misfit = Callable[[Call, Any, str, str], "str | None"]
Raised = Callable[..., Outcome]
T = TypeVar("T")


class _StreamFailed(Exception):
    """The stream's own Redis traffic (credit, control, items) failed: the worker's failure, which
    the call reports as an internal error, never as an exception the method raised."""


async def _redis(what: str, op: Awaitable[T]) -> T:
    try:
        return await op
    except REDIS_ERRORS as exc:
        raise _StreamFailed(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def _stream_failure(group: BaseExceptionGroup[BaseException]) -> _StreamFailed | None:
    """The first _StreamFailed inside (nested) task-group errors, if any."""
    for exc in group.exceptions:
        if isinstance(exc, _StreamFailed):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _stream_failure(exc)) is not None:
            return found
    return None


async def run_stream(ctx: WorkerContext, call: Call, items: AsyncIterator[Any], misfit: Misfit,
                     raised: Raised) -> Outcome:  # fmt: skip
    """Send ``items`` as they come, never more than the caller's credit ahead; the call's outcome.

    The caller raises its credit as it consumes items and sets ``cancel``
    when it stops early; the producer is then closed, as it is at the
    deadline (a caller that vanished stops granting credit).
    """
    req = call.request
    scope = Keys.scope_of(call.entry.stream)  # the call's shard: its reply stream's slot
    control = ctx.keys.stream_control(scope, req.call_id)
    wake = ctx.keys.stream_wake(scope, req.call_id)
    writer = ctx.writer_for(scope)
    ttl_ms = int(ctx.options.reply_ttl * 1000)
    # Room for a message's own fields around its items (call id, worker id, positions, framing).
    overhead = len(req.call_id.encode()) + len(ctx.worker_id.encode()) + 64
    room = ctx.options.max_payload - overhead
    credit, cancelled, produced = protocol.STREAM_WINDOW, False, 0
    buffer: list[bytes] = []
    filled = anyio.Event()
    finished = False
    failure: Callable[[], Outcome] | None = None  # built once the items before it are out

    def grant(state: dict[Any, Any]) -> None:
        nonlocal credit, cancelled
        credit = max(credit, int(state.get(b"credit", b"0") or 0))
        cancelled = cancelled or bool(state.get(b"cancel"))

    async def watch() -> None:
        while not cancelled:
            await anyio.sleep(POLL)
            grant(await _redis("reading the stream's control hash", ctx.redis.hgetall(control)))
        tg.cancel_scope.cancel()

    async def await_credit() -> None:
        nonlocal credit
        while produced >= credit and not cancelled:
            token = await _redis("waiting for the caller's credit", ctx.redis.blpop([wake], timeout=POLL))
            if token is not None and token[1].isdigit():
                credit = max(credit, int(token[1]))
            else:
                grant(await _redis("reading the stream's control hash", ctx.redis.hgetall(control)))

    async def send() -> None:
        nonlocal filled
        while True:
            await filled.wait()
            filled = anyio.Event()
            if buffer:
                batch = buffer[:]
                buffer.clear()
                items_sent = _STREAM_ITEMS(writer, [req.reply_to], [ttl_ms, *messages(batch)])
                await _redis("sending stream items", items_sent)
                call.items_sent += len(batch)
            if finished and not buffer:
                return

    def messages(batch: list[bytes]) -> list[bytes]:
        """``batch`` (items from position ``call.items_sent``) in messages within the size limit."""
        out, first, size, start = [], 0, 0, call.items_sent
        for i, item in enumerate(batch):
            if i > first and size + len(item) > room:
                out.append(protocol.encode_items(req.call_id, start + first, batch[first:i], ctx.worker_id))
                first, size = i, 0
            size += len(item)
        out.append(protocol.encode_items(req.call_id, start + first, batch[first:], ctx.worker_id))
        return out

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as sending:
                sending.start_soon(send)
                try:
                    async for item in items:
                        await await_credit()
                        if cancelled:
                            break
                        what = f"item {produced} of {req.method}()"
                        problem = misfit(call, item, what, "item")
                        if problem is not None:
                            failure = functools.partial(
                                call.fail, WireError.BAD_RESULT, problem, {"items": produced}
                            )
                            break
                        try:
                            encoded = protocol.pack(item)
                        except EncodeError as exc:
                            failure = functools.partial(
                                call.fail, WireError.ENCODE_ERROR, f"{what} {exc.message}"
                            )
                            break
                        if len(encoded) > room:
                            err = protocol.size_error(what, len(encoded) + overhead, ctx.options.max_payload)
                            failure = functools.partial(call.fail, err.type, err.message)
                            break
                        buffer.append(encoded)
                        produced += 1
                        filled.set()
                except _StreamFailed:
                    raise
                except Exception as exc:
                    failure = functools.partial(raised, call, exc, items=produced)
                finally:
                    finished = True
                    filled.set()
                    with anyio.CancelScope(shield=True):
                        await items.aclose()  # type: ignore[attr-defined]
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failed = _stream_failure(group)
        if failed is None:
            raise
        raise failed from failed.__cause__
    if cancelled:
        ctx.log.logger.info("worker %s: caller stopped %s() after %d item(s)", ctx.worker_id,
                            req.method, call.items_sent)  # fmt: skip
        return Reply(True, req.deadline_ms)  # acknowledged, unanswered: the caller is gone
    if failure is not None:
        return failure()
    end = protocol.encode_end(req.call_id, call.items_sent, ctx.worker_id)
    return Reply(True, req.deadline_ms, req.reply_to, end)
