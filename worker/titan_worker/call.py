"""A call as it flows through a worker: its entry, request, method, deadline and outcome.

Middleware and the method's runner receive a ``Call`` and return an
``Outcome``, made by ``call.ok(value)`` or ``call.fail(type, message)``;
``settlement`` then writes it. Nothing else is threaded through signatures.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from titan_broker._errors import EncodeError, WireError
from titan_broker._service import MethodSpec
from titan_broker._wire import protocol
from titan_broker._wire import safe_str as safe_str


@dataclass(frozen=True, slots=True)
class Entry:
    """A stream entry a worker holds: where it came from and its raw fields."""

    stream: str
    id: bytes
    fields: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended, ready to settle.

    ``payload`` is the reply for ``reply_to`` (None: acknowledge without an
    answer). ``dead_reason`` set: the entry goes to the dead letters instead.
    ``handed_off``: already acknowledged, by the hand-off to another worker (nothing to settle here).
    """

    ok: bool
    reply_to: str | None = None
    payload: bytes | None = None
    value: Any = None
    """The result, when ok (for @cache)."""
    dead_reason: str | None = None
    handed_off: bool = False
    job: bool = False
    """``reply_to`` is a job's hash: the outcome is kept there (settling.lua's ``answer``)."""
    retry_in: float | None = None
    """Set by @retry: run the call again this many seconds from now instead of answering."""


@dataclass(slots=True, eq=False)
class Call:
    """One request being served."""

    entry: Entry
    request: protocol.Request
    spec: MethodSpec
    worker_id: str
    deadline: float
    """time.monotonic() at which the call's deadline (in Redis's clock) passes."""
    max_payload: int
    expose_tracebacks: bool = False
    items_sent: int = 0
    """Items a streaming call has sent so far."""
    error_id: str | None = field(default=None)
    """Set when the call failed with an exception: the id under which the worker logged it."""
    exception: BaseException | None = field(default=None)
    """The exception the method raised, when it raised (for @retry)."""

    @property
    def method(self) -> str:
        return self.request.method

    def remaining(self) -> float:
        """Seconds until the deadline (negative once it has passed)."""
        return self.deadline - time.monotonic()

    def ok(self, value: Any) -> Outcome:
        """A success reply, or the error for a result that cannot be encoded or is too large."""
        try:
            payload = protocol.encode_ok(self.request.call_id, value, self.worker_id)
        except EncodeError as exc:
            return self.fail(WireError.ENCODE_ERROR, f"result of {self.method}() {exc.message}")
        if len(payload) > self.max_payload:
            err = protocol.size_error(f"result of {self.method}()", len(payload), self.max_payload)
            return self.fail(err.type, err.message)
        return Outcome(True, self.request.reply_to, payload, value, job=self.request.job is not None)

    def fail(self, type: str, message: str, details: dict[str, Any] | None = None) -> Outcome:
        """An error reply ``{type, message, details}``."""
        payload = protocol.encode_error(self.request.call_id, type, message, self.worker_id, details)
        return Outcome(False, self.request.reply_to, payload, job=self.request.job is not None)

    def raised(
        self, exc: BaseException, type: str | None = None, message: str | None = None, **details: Any
    ) -> Outcome:
        """The error reply for an exception: its type and message, and an id under which the
        worker logs its traceback (the traceback itself only with ``expose_tracebacks``)."""
        self.error_id = uuid.uuid4().hex[:12]
        self.exception = exc
        details["error_id"] = self.error_id
        if self.expose_tracebacks:
            details["traceback"] = "".join(traceback.format_exception(exc)[-8:])
        return self.fail(type or exc.__class__.__name__, message or safe_str(exc), details)


Next = Callable[[Call], Awaitable[Outcome]]
"""The rest of the chain, as a middleware sees it."""

Middleware = Callable[[Call, Next], Awaitable[Outcome]]
"""``async def middleware(call, call_next) -> Outcome``: wraps the rest of the chain."""
