"""The circuit breaker: when it opens, lets one probe through, and closes again (a fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from titan_broker._calling.breaker import BreakerState, CircuitBreaker
from titan_broker._errors import (
    BacklogFull,
    BadArguments,
    CallTimeout,
    CircuitOpen,
    ConfigError,
    EncodeError,
    MethodNotFound,
    PayloadTooLarge,
    RateLimited,
    RedisUnavailable,
    RemoteError,
)

from .conftest import FakeClock


def tripped(failures: int = 3, reset_after: float = 10.0) -> BreakerState:
    """A breaker that has just opened after ``failures`` timeouts in a row."""
    state = BreakerState(CircuitBreaker(failures=failures, reset_after=reset_after), "svc")
    for _ in range(failures):
        state.before_call()
        state.after_call(CallTimeout("no answer"))
    assert state.state == "open"
    return state


def test_breaker_opens_after_the_configured_failures_in_a_row(clock: FakeClock) -> None:
    state = BreakerState(CircuitBreaker(failures=3, reset_after=10), "svc")
    for _ in range(2):
        state.before_call()
        state.after_call(CallTimeout("no answer"))
    assert state.state == "closed"
    state.before_call()  # the third may still go
    state.after_call(RemoteError("ValueError", "boom"))  # an error the service raised counts
    assert state.state == "open"
    with pytest.raises(CircuitOpen, match="'svc' is open after 3 failed calls") as info:
        state.before_call()
    assert info.value.retry_after == pytest.approx(10.0)


def test_breaker_counts_only_failures_in_a_row(clock: FakeClock) -> None:
    state = BreakerState(CircuitBreaker(failures=2, reset_after=10), "svc")
    for _ in range(5):
        state.before_call()
        state.after_call(BacklogFull("full"))
        state.before_call()
        state.after_call(None)  # a success in between resets the count
    assert state.state == "closed" and state.failures == 0


@pytest.mark.parametrize(
    "mistake",
    [
        BadArguments("titan.BadArguments", "argument 'a' must be float"),
        MethodNotFound("titan.MethodNotFound", "no method"),
        RateLimited("titan.RateLimited", "limited", {"retry_after": 0.1}),
        PayloadTooLarge("titan.PayloadTooLarge", "too big"),
        EncodeError("titan.EncodeError", "cannot encode"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_breaker_ignores_the_callers_own_mistakes(clock: FakeClock, mistake: Exception) -> None:
    state = BreakerState(CircuitBreaker(failures=1, reset_after=10), "svc")
    for _ in range(10):
        state.before_call()
        state.after_call(mistake)
    assert state.state == "closed"
    state.before_call()
    state.after_call(RedisUnavailable("gone"))  # a real failure still opens it
    assert state.state == "open"


def test_breaker_mistakes_do_not_reset_the_failure_count(clock: FakeClock) -> None:
    state = BreakerState(CircuitBreaker(failures=2, reset_after=10), "svc")
    state.before_call()
    state.after_call(CallTimeout("no answer"))
    state.before_call()
    state.after_call(BadArguments("titan.BadArguments", "bad"))  # neither a success nor a failure
    state.before_call()
    state.after_call(CallTimeout("no answer"))
    assert state.state == "open"


def test_breaker_stays_open_until_reset_after(clock: FakeClock) -> None:
    state = tripped(reset_after=10)
    clock.advance(9.9)
    with pytest.raises(CircuitOpen) as info:
        state.before_call()
    assert info.value.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    assert state.state == "half-open"
    state.before_call()  # the probe goes


def test_breaker_lets_a_single_probe_through_while_half_open(clock: FakeClock) -> None:
    state = tripped()
    clock.advance(10)
    state.before_call()  # the probe
    assert state.state == "half-open"
    for _ in range(3):  # everyone else fails fast while the probe is out
        with pytest.raises(CircuitOpen):
            state.before_call()
    clock.advance(60)  # however long the probe takes
    with pytest.raises(CircuitOpen):
        state.before_call()


def test_breaker_successful_probe_closes_the_circuit(clock: FakeClock) -> None:
    state = tripped(failures=3)
    clock.advance(10)
    state.before_call()
    state.after_call(None)
    assert state.state == "closed" and state.failures == 0
    state.before_call()
    state.after_call(CallTimeout("no answer"))  # one failure does not re-open a closed circuit of 3
    assert state.state == "closed"


def test_breaker_failed_probe_reopens_for_a_full_reset_after(clock: FakeClock) -> None:
    state = tripped(reset_after=10)
    clock.advance(10)
    state.before_call()
    state.after_call(CallTimeout("still down"))
    assert state.state == "open"
    clock.advance(9.9)  # counted from the failed probe, not from the first opening
    with pytest.raises(CircuitOpen):
        state.before_call()
    clock.advance(0.1)
    state.before_call()  # the next probe
    assert state.state == "half-open"


def test_breaker_probe_ended_by_a_caller_mistake_frees_the_probe(clock: FakeClock) -> None:
    state = tripped()
    clock.advance(10)
    state.before_call()
    state.after_call(BadArguments("titan.BadArguments", "bad"))  # says nothing about the service
    assert state.state == "half-open"
    state.before_call()  # another probe may go; the circuit neither closed nor re-opened
    state.after_call(None)
    assert state.state == "closed"


def test_breaker_cancelled_probe_frees_the_probe(clock: FakeClock) -> None:
    state = tripped()
    clock.advance(10)
    state.before_call()
    state.after_call(asyncio.CancelledError())  # the caller gave up: no verdict
    state.before_call()
    assert state.state == "half-open"


@pytest.mark.parametrize(("failures", "reset_after"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_breaker_refuses_a_bad_configuration(failures: int, reset_after: float) -> None:
    with pytest.raises(ConfigError, match="failures >= 1 and reset_after > 0"):
        CircuitBreaker(failures=failures, reset_after=reset_after)
