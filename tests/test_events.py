"""The event bus of the process manager: subscribers, buffers, and the log every event goes to."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from titan_broker import (
    ProcessManager,
    RestartPolicy,
)
from titan_broker._processes.events import Event, EventBus

from .conftest import POOLED, Recorder


def event(kind: Any = "ready", n: int = 0) -> Event:
    return Event(kind, "svc", f"w{n}", 100 + n, f"detail {n}")


pytestmark = pytest.mark.anyio


def test_a_raising_callback_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(e: Event) -> None:
        raise RuntimeError("observer bug")

    bus.on(lambda e: seen.append(f"first {e.worker_id}"))
    bus.on(broken)
    bus.on(lambda e: seen.append(f"last {e.worker_id}"))
    with caplog.at_level(logging.ERROR, logger="titan_broker.events"):
        bus.emit(event(n=1))
        bus.emit(event(n=2))
    assert seen == ["first w1", "last w1", "first w2", "last w2"]
    failures = [r for r in caplog.records if "event callback" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info is not None
    assert failures[0].exc_info[0] is RuntimeError


def test_unsubscribed_callback_is_not_called_again() -> None:
    bus = EventBus()
    seen: list[int | None] = []
    others: list[int | None] = []
    off = bus.on(lambda e: seen.append(e.pid))
    bus.on(lambda e: others.append(e.pid))
    bus.emit(event(n=1))
    off()
    bus.emit(event(n=2))
    assert seen == [101]
    assert others == [101, 102]


@pytest.mark.parametrize(
    ("kind", "level"),
    [("ready", logging.INFO), ("stopped", logging.INFO), ("crashed", logging.WARNING),
     ("failed", logging.WARNING), ("unhealthy", logging.WARNING)],
)  # fmt: skip
def test_every_event_is_logged_at_its_level(caplog: pytest.LogCaptureFixture, kind: str, level: int) -> None:
    bus = EventBus()
    with caplog.at_level(logging.DEBUG, logger="titan_broker.events"):
        bus.emit(event(kind, 3))
    [record] = [r for r in caplog.records if r.name == "titan_broker.events"]
    assert record.levelno == level
    assert record.getMessage() == f"{kind}: svc w3 (pid 103): detail 3"


@pytest.mark.anyio
async def test_a_slow_subscriber_loses_events_past_its_buffer_and_never_blocks_the_emitter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    events = bus.subscribe(buffer=2)
    received: list[str | None] = []

    async def take_one() -> None:
        received.append((await events.__anext__()).worker_id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take_one)
        await anyio.wait_all_tasks_blocked()  # the subscriber is registered and waiting
        bus.emit(event(n=0))
    assert received == ["w0"]
    # The subscriber now takes nothing: emit (not async: it cannot wait) must not raise either.
    with caplog.at_level(logging.WARNING, logger="titan_broker.events"):
        for n in range(1, 6):
            bus.emit(event(n=n))
    dropped = [r for r in caplog.records if "not keeping up" in r.getMessage()]
    assert len(dropped) == 3  # w3, w4, w5: the buffer holds 2
    for _ in range(2):
        await take_one()
    assert received == ["w0", "w1", "w2"]
    bus.emit(event(n=6))  # caught up: it receives again
    await take_one()
    assert received[-1] == "w6"
    await events.aclose()  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_closed_subscription_gets_nothing_and_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    events = bus.subscribe(buffer=1)
    async with anyio.create_task_group() as tg:

        async def first() -> None:
            assert (await events.__anext__()).worker_id == "w0"

        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        bus.emit(event(n=0))
    await events.aclose()  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="titan_broker.events"):
        for n in range(5):
            bus.emit(event(n=n))  # with the stream still registered, the second would warn
    assert not [r for r in caplog.records if "not keeping up" in r.getMessage()]


@pytest.mark.anyio
async def test_closing_the_bus_ends_every_subscription() -> None:
    bus = EventBus()
    got: list[str] = []

    async def listen() -> None:
        async for e in bus.subscribe():
            got.append(e.kind)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await anyio.wait_all_tasks_blocked()
            bus.emit(event("ready"))
            bus.emit(event("stopped"))
            await anyio.wait_all_tasks_blocked()
            bus.close()  # listen() returns: the task group can exit
    assert got == ["ready", "stopped"]


# -- "Events ... They are logged too (logger titan_broker._processes.events)"
async def test_lifecycle_events_are_logged(pm: ProcessManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="titan_broker.events")
    recorder = Recorder(pm)
    pool = await pm.pool(POOLED, restart=RestartPolicy(backoff=0.1))
    crashed = await pool.proxy.exit_soon()
    await recorder.wait_for("restarted")
    await pool.close()
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "titan_broker.events"]
    assert [str(e) for e in recorder.events] == [message for _level, message in logged]  # each one, once
    levels = {message.split(":")[0]: level for level, message in logged}
    assert levels == {"ready": "INFO", "crashed": "WARNING", "restarted": "INFO", "stopped": "INFO"}
    assert any(m.startswith("crashed: pooled ") and f"(pid {crashed})" in m for _l, m in logged)
