"""The pytest plugin of titan-broker, loaded by itself wherever titan-broker is installed (entry point
``pytest11``), with four fixtures:

- ``titan_redis_url`` (session): ``$TITAN_TEST_REDIS_URL``, else a private redis-server started
  once for the session and stopped at exit. Nothing is ever flushed: tests write under fresh
  namespaces.
- ``titan_namespace``: a fresh namespace for each test.
- ``titan_client``: a connected ``Client`` in that namespace.
- ``titan_manager``: a connected ``ProcessManager`` in that namespace, for tests that spawn real
  worker processes; leaving the test stops them.

The two async fixtures run on the test's event loop under the anyio plugin
(``@pytest.mark.anyio``) and under pytest-asyncio (``@pytest.mark.asyncio``,
strict or auto mode).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import pytest

from .._calling.client import Client
from .._processes.manager import ProcessManager
from ._shared_redis import local_redis_url

_ASYNC_FIXTURES = ("titan_client", "titan_manager")


@pytest.fixture(scope="session")
def titan_redis_url() -> str:
    """The URL of the Redis for this test session (``$TITAN_TEST_REDIS_URL``, else a private one)."""
    return local_redis_url()


@pytest.fixture
def titan_namespace() -> str:
    """A namespace of this test's own, so that tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def titan_client(titan_redis_url: str, titan_namespace: str) -> AsyncIterator[Client]:
    """A connected Client in this test's namespace."""
    async with Client(titan_redis_url, namespace=titan_namespace) as client:
        yield client


@pytest.fixture
async def titan_manager(titan_redis_url: str, titan_namespace: str) -> AsyncIterator[ProcessManager]:
    """A connected ProcessManager in this test's namespace; the workers it spawned stop with the test."""
    async with ProcessManager(titan_redis_url, namespace=titan_namespace) as manager:
        yield manager


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: Any, request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
    """Hand this plugin's async fixtures to pytest-asyncio for a test it runs (``@pytest.mark.asyncio``).

    The anyio plugin takes any async fixture of a test that uses ``anyio_backend``; pytest-asyncio
    in strict mode only the ones marked for it. Marking them for good would make pytest-asyncio
    take them from anyio tests too (onto an event loop of its own), so they are marked while one
    test uses them, and only when the test is pytest-asyncio's.
    """
    if (
        fixturedef.argname in _ASYNC_FIXTURES
        and fixturedef.func.__module__ == __name__
        and "anyio_backend" not in request.fixturenames
        and request.node.get_closest_marker("asyncio") is not None
    ):
        original = fixturedef.func
        fixturedef.func = _for_pytest_asyncio(original)

        def restore() -> None:
            fixturedef.func = original

        # Marked until the fixture's tear-down: pytest-asyncio looks at it again when the test runs.
        fixturedef.addfinalizer(restore)
    return (yield)


def _for_pytest_asyncio(func: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """The fixture ``func`` marked as pytest-asyncio's own, its set-up and tear-down run in one task.

    pytest-asyncio runs a fixture's set-up and its tear-down as two tasks; a Client holds a task
    group, which must be left by the task that entered it. So the fixture's generator runs in a
    task of its own, which waits between the two.
    """

    @functools.wraps(func)
    async def in_one_task(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()

        async def hold() -> None:
            steps = func(*args, **kwargs)
            try:
                value = await anext(steps)
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(value)
            await done.wait()
            async for _ in steps:
                raise RuntimeError(f"fixture {func.__name__} yielded twice")

        task = asyncio.create_task(hold())
        try:
            yield await ready
        finally:
            done.set()
            await task

    in_one_task._force_asyncio_fixture = True  # type: ignore[attr-defined]
    return in_one_task
