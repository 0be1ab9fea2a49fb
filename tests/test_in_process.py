"""A worker runs in the caller's own process and event loop: no subprocess (what testing helpers
and embedded services build on)."""

from __future__ import annotations

import anyio
import pytest
from titan_worker import Worker

from processes.calculator import Calculator
from titan_broker import Client, RemoteError
from titan_broker._service.definition import describe

from .conftest import eventually

pytestmark = pytest.mark.anyio


async def test_worker_serves_in_process_and_stops_cleanly(redis_url: str, namespace: str) -> None:
    worker = Worker(describe(Calculator), url=redis_url, namespace=namespace)
    async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
        await tg.start(worker.run)
        calc = client.proxy("calculator", Calculator)
        assert await calc.add(2, 3) == 5
        with pytest.raises(RemoteError, match="Division by zero"):
            await calc.divide(1, 0)
        assert await client.live_workers("calculator") == 1
        worker.stop()
    # run() returned: the worker drained and left the registry.
    assert await eventually(lambda: _gone(redis_url, namespace), 5, "the record to go")


async def _gone(redis_url: str, namespace: str) -> bool:
    async with Client(redis_url, namespace=namespace) as client:
        return await client.live_workers("calculator") == 0
