"""A circuit breaker on the calling side: after repeated failures, fail fast for a while."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .._errors import (
    BadArguments,
    CircuitOpen,
    ConfigError,
    EncodeError,
    MethodNotFound,
    PayloadTooLarge,
    RateLimited,
)

# The caller's own mistakes say nothing about the service's health.
_NOT_FAILURES = (BadArguments, MethodNotFound, RateLimited, PayloadTooLarge, EncodeError, CircuitOpen)


@dataclass(frozen=True)
class CircuitBreaker:
    """Open after ``failures`` failed calls in a row; after ``reset_after`` seconds let one probe through.

    A failure is a timeout, a lost Redis, a full backlog, a dead letter or an
    error raised by the service; not the caller's own mistakes (bad
    arguments, unknown method, rate limit, oversized payload). While open,
    calls raise CircuitOpen at once. A successful probe closes the circuit;
    a failed one opens it again.
    """

    failures: int = 5
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if self.failures < 1 or self.reset_after <= 0:
            raise ConfigError(f"CircuitBreaker needs failures >= 1 and reset_after > 0, got {self}")


class BreakerState:
    """The state of one breaker, shared by every proxy of one service that uses it."""

    def __init__(self, config: CircuitBreaker, service: str) -> None:
        self.config = config
        self.service = service
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        """closed, open or half-open."""
        if self.opened_at is None:
            return "closed"
        if time.monotonic() - self.opened_at < self.config.reset_after or self.probing:
            return "open" if not self.probing else "half-open"
        return "half-open"

    def before_call(self) -> None:
        """Raise CircuitOpen unless this call may go (closed, or the one half-open probe)."""
        if self.opened_at is None:
            return
        waited = time.monotonic() - self.opened_at
        if waited < self.config.reset_after or self.probing:
            retry = max(0.0, self.config.reset_after - waited)
            raise CircuitOpen(
                f"circuit for {self.service!r} is open after {self.failures} failed calls in a row; "
                f"not calling (next probe in {retry:.1f} s)",
                retry,
            )
        self.probing = True

    def after_call(self, error: BaseException | None) -> None:
        """Count a call's outcome: None (success), an Exception (a failure unless the caller's own
        mistake), or another BaseException (cancelled, or a stream left with ``break``: no verdict,
        but a half-open probe is released, so that the next call probes again).

        Every ``before_call`` that returned must be matched by one ``after_call``, on every exit
        path (GeneratorExit and CancelledError are not Exceptions): a probe never reported keeps
        the circuit half-open for ever.
        """
        failed = error is not None and isinstance(error, Exception) and not isinstance(error, _NOT_FAILURES)
        if self.probing:
            self.probing = False
            if failed:
                self.opened_at = time.monotonic()
                return
        if failed:
            self.failures += 1
            if self.failures >= self.config.failures:
                self.opened_at = time.monotonic()
        elif error is None:
            self.failures = 0
            self.opened_at = None
