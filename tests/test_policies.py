"""The rules a pool acts on: crash back-off, replacement reasons, the autoscaler."""

from __future__ import annotations

import pytest

from titan_broker._processes.policies import (
    AutoScale,
    Autoscaler,
    CrashHistory,
    PoolSettings,
    RestartPolicy,
    replacement_reason,
)

from .test_registry import record

pytestmark = pytest.mark.anyio


"""The floors of ``titan_broker``, ground first: a part imports only from its own floor or the ones below."""


# -- the rules a pool acts on ----------------------------------------------------------------
def test_crash_history_backs_off_then_gives_up() -> None:
    history = CrashHistory(RestartPolicy(max_restarts=3, window=10.0, backoff=0.5, max_backoff=1.5))
    assert [history.record(t) for t in (0.0, 1.0, 2.0)] == [0.5, 1.0, 1.5]
    assert history.record(3.0) is None and len(history) == 4  # the 4th crash within 10 s
    # Crashes older than the window no longer count.
    assert history.record(12.5) == 1.0 and len(history) == 2


def test_replacement_reasons_in_order() -> None:
    settings = PoolSettings(recycle_after_calls=10, max_lifetime=60.0, memory_limit=100 * 2**20)
    assert replacement_reason(settings, record(calls=3), 5.0, 2**20) is None
    assert replacement_reason(settings, None, 5.0, 0) is None
    kind, detail = replacement_reason(settings, record(unhealthy_streak=3, calls=99), 99.0, 0) or ("", "")
    assert kind == "unhealthy" and "3 failed health checks" in detail
    assert replacement_reason(settings, record(calls=10), 5.0, 0) == (
        "recycled",
        "served 10 calls (limit 10)",
    )
    assert replacement_reason(settings, record(), 61.0, 0) == ("recycled", "lived 61 s (limit 60 s)")
    assert replacement_reason(settings, record(), 5.0, 200 * 2**20) == (
        "recycled", "RSS 200 MiB over the limit of 100 MiB",
    )  # fmt: skip


def test_autoscaler_grows_at_once_and_shrinks_after_its_cooldown() -> None:
    scaler = Autoscaler(AutoScale(min=1, max=3, target_cpu=0.5, cooldown=5.0), concurrency=4)
    assert scaler.target_backlog == 4
    assert scaler.decide(1, cpu=0.9, backlog=0, now=0.0) == 2  # CPU above target
    assert scaler.decide(2, cpu=0.0, backlog=9, now=1.0) == 3  # backlog above 4 per worker
    assert scaler.decide(3, cpu=2.9, backlog=0, now=2.0) is None  # at max
    assert scaler.decide(3, cpu=0.1, backlog=0, now=3.0) is None  # idle: the cooldown starts
    assert scaler.decide(3, cpu=0.1, backlog=0, now=7.0) is None
    assert scaler.decide(3, cpu=0.1, backlog=0, now=8.0) == 2
    assert scaler.decide(2, cpu=0.8, backlog=0, now=20.0) is None  # 0.8 on one worker would be above
    assert scaler.decide(1, cpu=0.0, backlog=0, now=30.0) is None  # at min
