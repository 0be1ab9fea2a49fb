"""The worker's token bucket for @rate_limit: bursts, refills, the rate over a long run (a fake clock)."""

from __future__ import annotations

import pytest
from titan_worker.middleware.rate_limit import LocalBucket

from .conftest import FakeClock


def test_bucket_admits_a_burst_then_refuses_with_the_wait(clock: FakeClock) -> None:
    bucket = LocalBucket(rps=4, burst=3)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.25)  # one token every 1/4 s
    clock.advance(0.1)
    assert bucket.take() == pytest.approx(0.15)  # a refusal takes no token
    clock.advance(0.15)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.25)


def test_bucket_refills_at_its_rate_up_to_the_burst(clock: FakeClock) -> None:
    bucket = LocalBucket(rps=10, burst=2)
    bucket.take()
    bucket.take()
    clock.advance(3600)  # idle for an hour: still only a burst of 2
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]
    admitted = 0
    for _ in range(100):  # 10 s at 10/s, asking every 0.1 s
        clock.advance(0.1)
        admitted += bucket.take() == 0.0
    assert admitted == 100


def test_bucket_rate_over_a_long_run_is_the_configured_rate(clock: FakeClock) -> None:
    bucket = LocalBucket(rps=5, burst=1)
    admitted = 0
    for _ in range(10_000):  # 10 s of a caller asking every millisecond
        admitted += bucket.take() == 0.0
        clock.advance(0.001)
    assert 50 <= admitted <= 51  # 5/s for 10 s, plus the first token
