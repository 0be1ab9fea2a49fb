"""Spawning a service and calling it through its typed proxy."""

from __future__ import annotations

import time

import anyio
import pytest

from processes.calculator import Calculator
from titan_broker import (
    BacklogFull,
    BadArguments,
    CallTimeout,
    Client,
    ConfigError,
    MethodNotFound,
    NoLiveWorkers,
    ProcessManager,
    RemoteError,
    with_options,
)
from titan_broker._calling.proxy import CallTiming

from .conftest import (
    CALCULATOR,
    SERVICES,
    Workers,
)

pytestmark = pytest.mark.anyio


async def test_spawned_calculator_answers_every_method(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR, Calculator)
    assert await calc.add(5, 3) == 8
    assert await calc.subtract(5, 3) == 2
    assert await calc.multiply(4, 2.5) == 10
    assert await calc.divide(9, 3) == 3
    assert await calc.power(2, 10) == 1024
    assert await calc.factorial(20) == 2432902008176640000
    assert await calc.factorial(30) == 265252859812191058636308480000000  # beyond 64 bits
    assert await calc.get_stats() == {"operation_count": 7, "last_operation": "factorial"}


async def test_dependencies_reach_init_by_name(pm: ProcessManager) -> None:
    svc = await pm.spawn(SERVICES / "deps.py", dependencies={"config": {"host": "db", "port": 5432}})
    assert await svc.seen() == {"config": {"host": "db", "port": 5432}, "label": "none"}
    calc = await pm.spawn(CALCULATOR, Calculator, dependencies={"precision": 2})
    assert await calc.divide(1, 3) == 0.33


async def test_remote_exception_carries_type_and_message(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR, Calculator)
    with pytest.raises(RemoteError) as info:
        await calc.divide(1, 0)
    assert info.value.type == "ValueError"
    assert info.value.message == "Division by zero"
    # The caller learns an error id, not the worker's traceback (that is in the worker's log).
    assert "traceback" not in info.value.details
    assert len(info.value.details["error_id"]) == 12
    with pytest.raises(RemoteError, match="negative"):
        await calc.factorial(-1)
    assert await calc.add(1, 1) == 2  # the worker keeps serving


async def test_timeout_fails_the_call_when_time_is_up(pm: ProcessManager) -> None:
    slow = await pm.spawn(SERVICES / "slow.py")
    quick = slow.with_options(timeout=0.3)
    started = time.monotonic()
    with pytest.raises(CallTimeout) as info:
        await quick.sleep(5)
    assert 0.3 <= time.monotonic() - started < 1.5  # at its timeout: neither early nor hung
    assert type(info.value) is CallTimeout  # a worker is alive: not NoLiveWorkers
    # The worker cancelled the overrun call: its slot is free for the next one.
    assert (await slow.sleep(0, tag=7))["tag"] == 7


async def test_typed_with_options_keeps_the_proxy_type(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR, Calculator)
    fast = with_options(calc, timeout=5.0)
    assert await fast.add(2, 2) == 4
    with pytest.raises(TypeError):
        with_options(object(), timeout=1.0)


@pytest.mark.parametrize("method", ["_record", "init", "__init__", "__class__", "close", "health", "nope"])
async def test_only_public_methods_can_be_called(pm: ProcessManager, method: str) -> None:
    await pm.spawn(CALCULATOR, Calculator)
    with pytest.raises(MethodNotFound, match=method):
        await pm.client.call("calculator", method, ("add", 1.0))
    assert await pm.client.call("calculator", "add", (1, 2)) == 3


async def test_proxy_refuses_unknown_attribute_locally(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR)
    with pytest.raises(AttributeError, match="no public method 'nope'"):
        calc.nope  # noqa: B018


async def test_wrong_arguments_get_an_error_naming_the_signature(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR, Calculator)
    with pytest.raises(BadArguments, match=r"add\(a: float, b: float\) -> float"):
        await pm.client.call("calculator", "add", (1,))
    with pytest.raises(BadArguments, match="unexpected keyword"):
        await pm.client.call("calculator", "add", (1, 2), {"c": 3})
    assert await calc.add(1, 2) == 3


async def test_unencodable_result_is_an_error_reply(pm: ProcessManager) -> None:
    slow = await pm.spawn(SERVICES / "slow.py")
    with pytest.raises(RemoteError, match="msgpack"):
        await slow.unencodable()
    assert await slow.echo([1, "two", {"three": 3.0}, b"\x00"]) == [1, "two", {"three": 3.0}, b"\x00"]


async def test_sync_public_method_runs_in_a_thread(pm: ProcessManager) -> None:
    slow = await pm.spawn(SERVICES / "slow.py")
    assert isinstance(await slow.blocking_pid(), int)


async def test_call_to_service_without_workers_says_so(pm: ProcessManager) -> None:
    ghost = await pm.connect("ghost")
    with pytest.raises(NoLiveWorkers, match="no live worker"):
        await ghost.with_options(timeout=0.3).anything()


async def test_connect_reaches_a_service_spawned_elsewhere(redis_url: str, namespace: str) -> None:
    async with ProcessManager(redis_url, namespace=namespace) as owner:
        await owner.spawn(CALCULATOR, Calculator)
        async with ProcessManager(redis_url, namespace=namespace) as other:
            remote = await other.connect("calculator", Calculator)
            assert await remote.multiply(6, 7) == 42


async def test_concurrent_calls_from_one_client_get_their_own_answers(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR, Calculator)
    results: dict[int, float] = {}

    async def one(i: int) -> None:
        results[i] = await calc.add(i, 1000)

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, i)
    assert results == {i: i + 1000 for i in range(200)}


async def test_leaving_the_manager_stops_spawned_workers(redis_url: str, namespace: str) -> None:
    async with ProcessManager(redis_url, namespace=namespace) as manager:
        await manager.spawn(CALCULATOR, Calculator)
        procs = [w.process for w in manager.workers]
    assert [p.returncode for p in procs] == [0]


async def test_full_backlog_refuses_calls_at_once(workers: Workers, redis_url: str, namespace: str) -> None:
    workers.start(SERVICES / "small_backlog.py", "--concurrency", "1")
    workers.wait_registered("small-backlog", 1)
    async with Client(redis_url, namespace=namespace) as client:
        outcomes: list[object] = []

        async def one() -> None:
            try:
                outcomes.append(await client.call("small-backlog", "wait", (0.5,)))
            except BacklogFull as exc:
                outcomes.append(exc)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
        refused = [o for o in outcomes if isinstance(o, BacklogFull)]
        assert len(refused) == 3
        assert "max_backlog=5" in str(refused[0])
        assert outcomes.count(0.5) == 5
        assert time.monotonic() - started < 10


def test_booleans_are_not_seconds() -> None:
    with pytest.raises(ConfigError, match=r"delay must be a number of seconds .* got True"):
        CallTiming().with_options(delay=True, at=None, deadline=None, result_ttl=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"deadline must be a number of seconds .* got True"):
        CallTiming().with_options(delay=None, at=None, deadline=True, result_ttl=None)  # type: ignore[arg-type]


async def test_a_boolean_delay_or_timeout_is_refused(pm: ProcessManager) -> None:
    with pytest.raises(ConfigError, match=r"delay must be a number of seconds .* got True"):
        await pm.client.call("promised", "slow", (0,), delay=True)
    with pytest.raises(ConfigError, match=r"timeout must be a number of seconds .* got True"):
        await pm.client.call("promised", "slow", (0,), timeout=True)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 1e30, 0, -1, "5"])
async def test_a_timeout_that_is_not_a_sane_number_of_seconds_is_refused_before_sending(
    pm: ProcessManager, timeout: object
) -> None:
    with pytest.raises(ConfigError, match=r"timeout must be a number of seconds"):
        await pm.client.call("promised", "slow", (0,), timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"timeout must be a number of seconds"):
        pm.client.proxy("promised").with_options(timeout=timeout)  # type: ignore[arg-type]
