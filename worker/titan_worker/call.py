"""A call as it flows through a worker: its entry, request, method, deadline and outcome.

Middleware and the method's runner receive a ``Call`` and return an
``Outcome``: a ``Reply`` (made by ``call.ok(value)`` or ``call.fail(type, message)``),
a ``Retry``, a ``DeadLetter`` or ``HandedOff``; ``settlement`` then writes it. Nothing else
is threaded through signatures.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
class Reply:
    """Answer the call: ``payload`` goes to ``reply_to`` (a reply stream, or a job's hash when ``job``)
    and the entry is acknowledged; without a payload the entry is only acknowledged (nobody reads an
    answer: the caller is gone)."""

    ok: bool
    deadline_ms: int | None
    """The call's deadline in Redis's clock (None: the request could not be read)."""
    reply_to: str | None = None
    payload: bytes | None = None
    value: Any = None
    """The result, when ok (for @cache)."""
    job: bool = False


@dataclass(frozen=True, slots=True)
class Retry:
    """Run the call again ``delay`` seconds from now (@retry) instead of answering; a job shows
    ``failure``, this run's error, while it waits."""

    failure: Reply
    delay: float
    ok: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Move the entry to the service's dead letters (nothing can answer it)."""

    reason: str
    deadline_ms: int | None = None
    deliveries: int = 1
    """How often the entry was delivered (its workers died that often)."""
    ok: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class HandedOff:
    """The call went to a worker that has its method; the hand-off acknowledged it here."""

    ok: ClassVar[bool] = False


Outcome = Reply | Retry | DeadLetter | HandedOff
"""How a call ended, ready to settle: one ``match`` in ``settlement``."""


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

    def ok(self, value: Any) -> Reply:
        """A success reply, or the error for a result that cannot be encoded or is too large."""
        try:
            payload = protocol.encode_ok(self.request.call_id, value, self.worker_id)
        except EncodeError as exc:
            return self.fail(WireError.ENCODE_ERROR, f"result of {self.method}() {exc.message}")
        if len(payload) > self.max_payload:
            err = protocol.size_error(f"result of {self.method}()", len(payload), self.max_payload)
            return self.fail(err.type, err.message)
        req = self.request
        return Reply(True, req.deadline_ms, req.reply_to, payload, value, job=req.job is not None)

    def fail(self, type: str, message: str, details: dict[str, Any] | None = None) -> Reply:
        """An error reply ``{type, message, details}``."""
        payload = protocol.encode_error(self.request.call_id, type, message, self.worker_id, details)
        req = self.request
        return Reply(False, req.deadline_ms, req.reply_to, payload, job=req.job is not None)

    def raised(
        self, exc: BaseException, type: str | None = None, message: str | None = None, **details: Any
    ) -> Reply:
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
