"""The exception hierarchy: every error titan-broker raises derives from TitanError.

Errors that happen in a worker cross the wire as data (``{type, message,
details}``, see PROTOCOL.md) and are raised again at the caller as the
matching class below; they are never pickled.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class TitanError(Exception):
    """Base class of every error raised by titan-broker."""


class ConfigError(TitanError):
    """An option, URL or argument given to titan-broker is invalid."""


class ServiceFileError(TitanError):
    """A service file cannot be loaded: missing, fails to import, or not exactly one @process class."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class SpawnError(TitanError):
    """A worker process started by ProcessManager failed before it became ready."""

    def __init__(self, path: str, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(f"worker for {path} failed to start: {message}")
        self.path = path
        self.exit_code = exit_code
        self.child_message = message


class RedisUnavailable(TitanError):
    """Redis cannot be reached, refused the credentials, or dropped the connection."""


class AccessDenied(RedisUnavailable):
    """Redis refused a command for the ACL user's rules (``NOPERM``); the message names the command,
    the key and the role whose rule it is."""


class RedisOutOfMemory(RedisUnavailable):
    """Redis refused a write: it reached its ``maxmemory`` limit with the ``noeviction`` policy."""


class CallError(TitanError):
    """A call to a service did not produce a result."""


class CallTimeout(CallError):
    """A call was not answered before its deadline."""


class NoLiveWorkers(CallTimeout):
    """A call timed out and the service has no live worker to answer it (or, with
    ``wait_for_worker=False``, none was alive when it was about to be sent: it was not sent)."""


class BacklogFull(CallError):
    """The service's request stream holds its maximum backlog; the call was refused, not queued."""


class RemoteError(CallError):
    """The worker answered with an error; ``type`` names the remote exception class."""

    def __init__(self, type: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{type}: {message}" if message else type)
        self.type = type
        self.message = message
        self.details: dict[str, Any] = details or {}


class MethodNotFound(RemoteError):
    """The method does not exist on the service or is not @public."""


class BadArguments(RemoteError):
    """The arguments do not match the method's signature."""


class BadRequest(RemoteError):
    """The worker could not read the request (malformed entry, unknown protocol version)."""


class PayloadTooLarge(RemoteError):
    """The arguments or the result exceed the configured size limit."""


class DeadlineExceeded(RemoteError):
    """The worker dropped or cancelled the call because its deadline passed."""


class EncodeError(RemoteError):
    """A value could not be encoded with msgpack."""


class BadResult(RemoteError):
    """The method's result (or a streamed item) does not match its return annotation: refused by the
    worker, or by the caller when its own class annotates the method otherwise."""


class RateLimited(RemoteError):
    """A @rate_limit refused the call at once; ``retry_after`` says how many seconds to wait."""

    @property
    def retry_after(self) -> float:
        return float(self.details.get("retry_after", 0.0))


class CircuitOpen(CallError):
    """The caller's circuit breaker is open after repeated failures: the call was not sent."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadLettered(RemoteError):
    """The call was delivered more than its max_deliveries and moved to the dead letters."""


class InternalError(RemoteError):
    """The worker failed outside the method (its bookkeeping, not your code); ``details['error_id']``
    names the failure in the worker's log."""


class CallLost(CallError):
    """Redis lost the call before it was answered (it restarted without persistence, or its data was
    deleted); the call may or may not have run."""


class JobNotFound(TitanError):
    """No such job: it was never submitted, it ended longer ago than its result_ttl, or Redis lost it
    (it restarted without persistence: the message says so when this process had seen the job)."""


class JobCancelled(CallError):
    """The job was cancelled before it started, or between two @retry runs: it has no result."""


class WireError(StrEnum):
    """The ``type`` of an error reply raised by titan-broker itself (not by the service's code)."""

    METHOD_NOT_FOUND = "titan.MethodNotFound"
    BAD_ARGUMENTS = "titan.BadArguments"
    BAD_REQUEST = "titan.BadRequest"
    PAYLOAD_TOO_LARGE = "titan.PayloadTooLarge"
    DEADLINE_EXCEEDED = "titan.DeadlineExceeded"
    ENCODE_ERROR = "titan.EncodeError"
    BAD_RESULT = "titan.BadResult"
    DEAD_LETTERED = "titan.DeadLettered"
    RATE_LIMITED = "titan.RateLimited"
    INTERNAL = "titan.InternalError"
    UNKNOWN = "titan.Unknown"
    """Made by a caller for an error reply without a type."""
    BAD_REPLY = "titan.BadReply"
    """Made by a caller for a reply that carries neither value nor error (never sent by a worker)."""


# Protocol error types as they appear on the wire, mapped to their classes.
WIRE_ERRORS: dict[str, type[RemoteError]] = {
    WireError.METHOD_NOT_FOUND: MethodNotFound,
    WireError.BAD_ARGUMENTS: BadArguments,
    WireError.BAD_REQUEST: BadRequest,
    WireError.PAYLOAD_TOO_LARGE: PayloadTooLarge,
    WireError.DEADLINE_EXCEEDED: DeadlineExceeded,
    WireError.ENCODE_ERROR: EncodeError,
    WireError.BAD_RESULT: BadResult,
    WireError.DEAD_LETTERED: DeadLettered,
    WireError.RATE_LIMITED: RateLimited,
    WireError.INTERNAL: InternalError,
}


def remote_error(type: str, message: str, details: dict[str, Any] | None = None) -> RemoteError:
    """Build the exception that a wire error ``{type, message, details}`` stands for."""
    cls = WIRE_ERRORS.get(type, RemoteError)
    return cls(type, message, details)
