"""Turning an entry into an outcome: decode it, find the method, run its chain.

Every failure short of the process dying ends as an outcome here: a bad
entry as BadRequest (or a dead letter when it cannot be answered), an
unknown method as MethodNotFound (after offering it to a worker of another
version that has it), an exception in the method as its type and message,
and anything else that escapes (a bug, a Redis error in a middleware) as
titan.InternalError. None of them turns into a silent rerun.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from typing import Any

import anyio

from titan_broker._errors import EncodeError, WireError
from titan_broker._redis import Script
from titan_broker._service import MethodSpec
from titan_broker._wire import Keys, Mismatch, acl, protocol

from . import middleware
from .call import Call, DeadLetter, Entry, Next, Outcome, Reply
from .context import WorkerContext
from .handoff import Handoff
from .streaming import run_stream

_STARTED = Script("started")

MARK_PATIENCE = 1.0
"""Seconds a job's run waits at most for its mark (running, one more run) to reach Redis."""


def _ignore_failure(fut: asyncio.Future[Any] | asyncio.Task[Any]) -> None:
    """A status mark that did not reach Redis: the job's outcome still will (settlement retries it)."""
    if not fut.cancelled():
        fut.exception()


class Executor:
    """Serves entries for one service instance; a chain per method, built once."""

    def __init__(self, ctx: WorkerContext, instance: Any) -> None:
        self.ctx = ctx
        self.instance = instance
        self.handoff = Handoff(ctx)
        self._reply_prefixes = {scope: ctx.keys.reply_prefix(scope) for scope in ctx.scopes}
        """Per shard: its calls' replies go to its own slot, where their settle runs."""
        self._max_payload = ctx.options.max_payload
        self._chains: dict[str, Next] = {
            spec.name: middleware.chain(spec, ctx, self._runner(spec))
            for spec in ctx.definition.methods.values()
        }

    async def execute(self, entry: Entry) -> Outcome:
        """The outcome of an entry."""
        ctx = self.ctx
        scope = Keys.scope_of(entry.stream)
        prefix = self._reply_prefixes[scope]
        user = Keys.stream_user(entry.stream)
        if user is not None:  # a registered caller user's request: answered to that user's keys only
            prefix = f"{prefix}{user}{acl.USER_SEPARATOR}"
        try:
            req = protocol.decode_request(
                entry.fields, entry.id, reply_prefix=prefix, max_payload=self._max_payload
            )
            if user is not None and not req.call_id.startswith(f"{user}{acl.USER_SEPARATOR}"):
                raise protocol.BadEntry(
                    f"call id {protocol.excerpt(req.call_id)} on the stream of user {user!r} is not "
                    f"one of that user's (<user>.<random>-<n>)", call_id=None, reply_to=None,
                )  # fmt: skip
        except protocol.BadEntry as bad:
            ctx.log.log(logging.WARNING, "bad-entry", "worker %s: bad request entry %s: %s",
                        ctx.worker_id, entry.id.decode(), bad)  # fmt: skip
            if bad.call_id and bad.reply_to:
                payload = protocol.encode_error(bad.call_id, bad.type, str(bad), ctx.worker_id)
                return Reply(False, None, bad.reply_to, payload)
            return DeadLetter(f"unanswerable request: {bad}")
        if req.job is not None:  # its outcome goes to the job's hash
            req = dataclasses.replace(req, reply_to=ctx.keys.job(scope, req.job))
            await self._started(req, scope)
        spec = ctx.definition.methods.get(req.method)
        if spec is None:
            return await self.handoff.unknown_method(entry, req)
        call = Call(entry, req, spec, ctx.worker_id, ctx.clock.monotonic_deadline(req.deadline_ms),
                    ctx.options.max_payload, ctx.options.expose_tracebacks)  # fmt: skip
        if spec.streaming and req.job is not None:
            message = f"{req.method}() streams its results: it cannot run as a job (nobody would read them)"
            return call.fail(WireError.BAD_REQUEST, message)
        try:
            return await self._chains[spec.name](call)
        except Exception as exc:
            outcome = call.raised(exc, WireError.INTERNAL)
            if not ctx.log.log(logging.ERROR, f"internal:{spec.name}",
                               "worker %s: %s() failed outside the method [error %s]: %s",
                               ctx.worker_id, spec.name, call.error_id, exc, exc_info=exc):  # fmt: skip
                self._folded(logging.ERROR, call, exc)
            return outcome

    async def _started(self, req: protocol.Request, scope: str) -> None:
        """Mark a job running (its status, one more run, worker) before it runs: a run that kills
        its worker at once still counts. A job that has ended stays ended (a stale run of a
        reclaimed entry). Redis out of reach does not hold the run up (the mark is then left to
        the pipeline, ahead of the job's outcome)."""
        ctx = self.ctx
        assert req.reply_to is not None
        # Counted here, not taken from the request's @retry attempt: a rerun after its worker died
        # (the entry claimed by another) is a run too, and carries the same attempt number.
        mark = asyncio.ensure_future(
            _STARTED(ctx.writer_for(scope), [req.reply_to], [ctx.worker_id, int(ctx.clock.now_ms())])
        )
        mark.add_done_callback(_ignore_failure)
        with anyio.move_on_after(MARK_PATIENCE):
            await asyncio.wait([mark])

    def _runner(self, spec: MethodSpec) -> Next:
        """The innermost step of a chain: run the method itself."""
        method = getattr(self.instance, spec.name)
        if spec.streaming:
            return functools.partial(self._run_stream, method)
        if spec.is_async:
            return functools.partial(self._run_async, method)
        return functools.partial(self._run_thread, method)

    async def _run_async(self, method: Any, call: Call) -> Outcome:
        try:
            result = await method(*call.request.args, **call.request.kwargs)
        except Exception as exc:
            return self._raised(call, exc)
        return self._answer(call, result)

    async def _run_thread(self, method: Any, call: Call) -> Outcome:
        # A thread cannot be interrupted: abandoned only when the worker stops (see middleware.deadline).
        run = functools.partial(method, *call.request.args, **call.request.kwargs)
        try:
            result = await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        except Exception as exc:
            return self._raised(call, exc)
        return self._answer(call, result)

    def _answer(self, call: Call, result: Any) -> Outcome:
        """The reply to a result; titan.BadResult when it does not fit the return annotation."""
        problem = self._misfit(call, result, f"result of {call.method}()", "result")
        return call.ok(result) if problem is None else call.fail(WireError.BAD_RESULT, problem)

    def _misfit(self, call: Call, value: Any, what: str, root: str) -> str | None:
        """Why a result or item does not fit the method's annotation (logged), or None when it does."""
        returns = call.spec.returns
        if returns is None:
            return None
        try:
            returns.check(value)
            return None
        except EncodeError:
            return None  # it cannot be encoded at all: the encoding says so
        except Mismatch as exc:
            problem = exc.explain(what, root, returns.shown, value)
        ctx = self.ctx
        ctx.log.log(logging.WARNING, f"bad-result:{call.method}", "worker %s: %s", ctx.worker_id, problem)
        return problem

    def _raised(self, call: Call, exc: Exception, **details: Any) -> Outcome:
        """The service's code raised: the caller gets the type and message, the log the traceback."""
        outcome = call.raised(exc, **details)
        ctx = self.ctx
        level = logging.WARNING
        kind = f"raised:{call.method}:{type(exc).__name__}"
        if not ctx.log.log(level, kind, "worker %s: %s() raised %s [error %s]", ctx.worker_id,
                           call.method, type(exc).__name__, call.error_id, exc_info=exc):  # fmt: skip
            self._folded(level, call, exc)
        return outcome

    def _folded(self, level: int, call: Call, exc: BaseException) -> None:
        """One short line for an error whose traceback the log folded: a caller hands its id to an
        operator, who must find it, and the traceback of its kind logged shortly before."""
        ctx = self.ctx
        ctx.log.logger.log(level, "worker %s: %s() raised %s [error %s]: %s (traceback as the last one "
                           "logged for %s() in the last %g s)", ctx.worker_id, call.method,
                           type(exc).__name__, call.error_id, protocol.excerpt(str(exc), 200), call.method,
                           ctx.log.every)  # fmt: skip

    async def _run_stream(self, method: Any, call: Call) -> Outcome:
        """Send an async generator's items as they come, never more than the caller's credit ahead."""
        req = call.request
        return await run_stream(self.ctx, call, method(*req.args, **req.kwargs), self._misfit, self._raised)
