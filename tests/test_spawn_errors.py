"""A worker that cannot start fails pm.spawn quickly with the child's message and the file name."""

from __future__ import annotations

import time

import pytest

from titan_broker import ConfigError, ProcessManager, SpawnError, TitanError

from .conftest import CALCULATOR, SERVICES

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ("missing.py", "file not found"),
        ("no_process.py", "no @process class found"),
        ("two_processes.py", "2 @process classes found (First, Second)"),
        ("import_error.py", "No module named 'module_that_does_not_exist'"),
        ("init_fails.py", "init() raised RuntimeError: cannot open database 'sqlite://x'"),
    ],
)
async def test_spawn_failure_reports_child_message(pm: ProcessManager, file: str, message: str) -> None:
    path = SERVICES / file
    started = time.monotonic()
    with pytest.raises(SpawnError) as info:
        await pm.spawn(path, dependencies={"dsn": "sqlite://x"})
    assert message in str(info.value)
    assert file in str(info.value)
    assert time.monotonic() - started < 10
    assert pm.workers == []


async def test_spawn_refuses_a_class_that_is_not_the_file_s_service(pm: ProcessManager) -> None:
    from processes.calculator import Calculator

    with pytest.raises(ConfigError, match="serves 'slow'"):
        await pm.spawn(SERVICES / "slow.py", Calculator)


async def test_spawn_without_entering_the_manager_is_an_error() -> None:
    manager = ProcessManager("redis://127.0.0.1:1/0")
    with pytest.raises(TitanError, match="async with") as info:
        await manager.spawn(CALCULATOR)
    assert info.type is TitanError  # the base class itself: a usage error, nothing more specific
