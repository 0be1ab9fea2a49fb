"""titan-broker through Redis Sentinel: a primary, its replica and three sentinels (quorum 2).

Callers, workers and the CLI get ``redis+sentinel://127.0.0.1:<s1>,...,127.0.0.1:<s3>/titan`` and
must ask the sentinels where the primary is, and ask again when it fails over. Real servers and
sentinels, real worker processes; every wait is bounded. The failover test restarts the old
primary as a replica afterwards, so the set-up is whole for whatever runs next.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from processes.calculator import Calculator
from titan_broker import ProcessManager, RedisUnavailable, RemoteError, TitanError, with_options
from titan_broker._wire.keys import Keys
from titan_broker.testing._local_redis import LocalRedis, find_redis_server
from titan_broker.testing._local_sentinel import LocalSentinel

from .conftest import CALCULATOR, SERVICES, Recorder, RoutedWorkers, managed_workers, titan
from .test_cluster import CALL_TIMEOUT, chaos_pair, failover_under_load, in_thread

pytestmark = pytest.mark.anyio

STREAMER = SERVICES / "streamer.py"
PASSWORD = "titan-sentinel-secret"


def skip_without_redis_server() -> None:
    """A sentinel is ``redis-server --sentinel``: redis-server is all it takes."""
    try:
        find_redis_server()
    except TitanError as exc:
        pytest.skip(f"cannot start Redis Sentinel here: {exc}")


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    """A primary, a replica and 3 sentinels for the whole module (about 2 s to start)."""
    skip_without_redis_server()
    with LocalSentinel(sentinels=3) as s:
        yield s


@pytest.fixture(scope="module")
def secured_sentinel() -> Iterator[LocalSentinel]:
    """A primary and a replica that ask for a password, watched by one sentinel (which does not)."""
    skip_without_redis_server()
    with LocalSentinel(sentinels=1, password=PASSWORD) as s:
        yield s


@pytest.fixture
def sworkers(sentinel: LocalSentinel, namespace: str) -> Iterator[RoutedWorkers]:
    w = RoutedWorkers(sentinel.url, namespace, sentinel.client)
    yield w
    w.close()


def test_the_url_names_every_sentinel(sentinel: LocalSentinel) -> None:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinel.sentinels)
    assert sentinel.url == f"redis+sentinel://{hosts}/titan"
    assert sentinel.ready_problem() is None


async def test_calls_through_the_sentinels(
    sentinel: LocalSentinel, sworkers: RoutedWorkers, namespace: str, keys: Keys
) -> None:
    sworkers.start(CALCULATOR)
    [wid] = sworkers.wait_registered("calculator", 1)
    async with ProcessManager(sentinel.url, namespace=namespace, default_timeout=15.0) as pm:
        calc = await pm.connect("calculator", Calculator)
        assert await calc.add(5, 3) == 8
        assert await calc.add(a=1.5, b=2) == 3.5
        with pytest.raises(RemoteError, match="Division by zero") as info:
            await calc.divide(1, 0)
        assert info.value.type == "ValueError"
        streamer = await pm.spawn(STREAMER)
        assert [item async for item in streamer.numbers(100)] == list(range(100))
    assert managed_workers() == []
    # Everything went to the primary the sentinels name.
    client: Any = sentinel.client()
    try:
        assert client.hexists(keys.services, "calculator")
    finally:
        client.close()
    listed = titan(sentinel.url, namespace, "services", "--json")
    assert listed.returncode == 0, listed.stderr
    [service] = json.loads(listed.stdout)
    assert service["service"] == "calculator"
    assert [w for v in service["versions"] for w in v["workers"]] == [wid]
    called = titan(sentinel.url, namespace, "call", "calculator", "multiply", "6", "7")
    assert called.returncode == 0 and json.loads(called.stdout) == 42, called.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_primary_killed_under_load(sentinel: LocalSentinel, namespace: str) -> None:
    try:
        async with ProcessManager(sentinel.url, namespace=namespace, default_timeout=CALL_TIMEOUT) as pm:
            recorder = Recorder(pm)
            proxy, pids, right = await chaos_pair(pm)

            killed: list[LocalRedis] = []
            promoted: list[LocalRedis] = []
            await failover_under_load(
                lambda i: with_options(proxy, timeout=CALL_TIMEOUT).work(i, 20),
                lambda: killed.append(sentinel.kill_primary()),
                lambda: promoted.append(sentinel.wait_failover(killed[0], timeout=30)),
                right,
            )
            assert promoted[0] is not killed[0] and sentinel.primary() is promoted[0]
            # The same worker processes, never restarted: they followed the new primary by themselves.
            assert [w.pid for w in pm.workers] == pids
            assert all(w.process.returncode is None for w in pm.workers)
            assert not {"crashed", "restarted"} & set(recorder.kinds()), recorder.kinds()
        assert managed_workers() == []
    finally:
        await in_thread(sentinel.heal)  # the old primary back, as a replica of the new one


async def test_credentials_and_db_come_from_the_url(secured_sentinel: LocalSentinel, namespace: str) -> None:
    assert secured_sentinel.url.startswith(f"redis+sentinel://:{PASSWORD}@127.0.0.1:")
    url = f"{secured_sentinel.url}?db=2"
    workers = RoutedWorkers(url, namespace, lambda: secured_sentinel.client(db=2))
    try:
        workers.start(CALCULATOR)
        workers.wait_registered("calculator", 1)  # registered in db 2 of the primary
        async with ProcessManager(url, namespace=namespace) as pm:
            calc = await pm.connect("calculator", Calculator)
            assert await calc.add(2, 3) == 5
        db0: Any = secured_sentinel.client(db=0)
        try:
            assert not db0.exists(Keys(namespace).services)  # nothing written outside db 2
        finally:
            db0.close()
        wrong = secured_sentinel.url.replace(PASSWORD, "wrong-password")
        with pytest.raises(RedisUnavailable) as refused:
            async with ProcessManager(wrong, namespace=namespace):
                pass
        assert "wrong-password" not in str(refused.value)  # the password never shows in a message
    finally:
        workers.close()
