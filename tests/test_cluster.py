"""titan-broker on a real Redis Cluster: 3 primaries, 3 replicas, started once for this module.

Callers, workers and the CLI get the URL of ONE node (``redis://127.0.0.1:<port>``), as a user
would, and must find the cluster behind it themselves. Every service's keys share the hash tag
``{<service>}``, so a service lives in one slot, on one primary: the tests pick service names whose
slots land on the primaries they need (``LocalCluster.primary_for``), and check it.

Real redis-servers, real worker processes, no mocks; every wait is bounded. A test that kills a
primary heals the cluster afterwards (the old primary rejoins as a replica), so the others always
find 3 primaries with a replica each.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from redis import exceptions as rexc

from processes.calculator import Calculator
from titan_broker import (
    AutoScale,
    BadArguments,
    BadRequest,
    Client,
    DeadLettered,
    EncodeError,
    MethodNotFound,
    PayloadTooLarge,
    Pool,
    ProcessManager,
    RedisUnavailable,
    RemoteError,
    TitanError,
    with_options,
)
from titan_broker._errors import ConfigError
from titan_broker._redis.connection import Channel, titan_error
from titan_broker._redis.topology import discover
from titan_broker._wire.keys import GROUP, Keys
from titan_broker.testing._local_cluster import ClusterNode, LocalCluster
from titan_broker.testing._local_redis import TlsFiles

from .conftest import (
    CALCULATOR,
    CHAOS,
    FAST_FAILOVER,
    POOLED,
    SERVICES,
    Recorder,
    RoutedWorkers,
    eventually,
    in_thread,
    managed_workers,
    skip_without_cluster_binaries,
    titan,
    wait_until,
)
from .test_decorators import until_refused
from .test_pools import _with_calls

pytestmark = pytest.mark.anyio

SLOW = SERVICES / "slow.py"
STREAMER = SERVICES / "streamer.py"
DECORATED = SERVICES / "decorated.py"

CALL_TIMEOUT = 3.0
"""Seconds each call of a failover test may take."""
LATE_MARGIN = 1.5
"""Seconds past its timeout that a call may still take to return or raise (a busy 2-core machine)."""
RECOVERY_LIMIT = 10.0
"""Seconds after the promotion within which the service must answer again."""


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """3 primaries + 3 replicas for the whole module (about 2 s to start)."""
    skip_without_cluster_binaries()
    with LocalCluster(primaries=3, replicas=1) as c:
        yield c


@pytest.fixture
async def cpm(cluster: LocalCluster, namespace: str) -> AsyncIterator[ProcessManager]:
    """A manager given the URL of one node, like a user's; no worker may outlive it."""
    async with ProcessManager(cluster.url, namespace=namespace, default_timeout=15.0) as manager:
        yield manager
    assert managed_workers() == [], "a worker outlived its ProcessManager"


@pytest.fixture
def cworkers(cluster: LocalCluster, namespace: str) -> Iterator[RoutedWorkers]:
    """``titan-worker run`` processes given the URL of one node."""
    w = RoutedWorkers(cluster.url, namespace, cluster.client)
    yield w
    w.close()


@contextlib.contextmanager
def cluster_client(cluster: LocalCluster) -> Iterator[Any]:
    """redis-py's cluster client, to look at keys wherever they live (typed Any: its replies vary)."""
    client: Any = cluster.client()
    try:
        yield client
    finally:
        client.close()


def test_the_cluster_helper_knows_where_keys_live(cluster: LocalCluster) -> None:
    """LocalCluster itself: the helpers the tests below rely on agree with Redis."""
    assert len(cluster.nodes) == 6 and cluster.ready_problem() is None
    assert len(cluster.primary_nodes()) == 3
    key = Keys("t").calls("calculator")
    primary = cluster.primary_for(key)
    [replica] = cluster.replicas_of(primary)
    assert replica not in cluster.primary_nodes()
    without = cluster.nodes_without(key)
    assert len(without) == 4 and primary not in without and replica not in without
    with cluster_client(cluster) as client:
        client.set(key + ":probe", b"x")
        assert client.get(key + ":probe") == b"x"
        client.delete(key + ":probe")
    names = cluster.names_on_distinct_primaries(["a", "b", "c"])
    assert len({cluster.primary_for(f"{{{name}}}").port for name in names}) == 3


# --- calls across services on three primaries ---------------------------------------------------


async def test_calls_reach_three_services_on_three_primaries(
    cluster: LocalCluster, cpm: ProcessManager, keys: Keys
) -> None:
    calc_name, slow_name, chaos_name = cluster.names_on_distinct_primaries(["calculator", "slow", "chaos"])
    primaries = {cluster.primary_for(keys.calls(n)).port for n in (calc_name, slow_name, chaos_name)}
    assert len(primaries) == 3, primaries

    calc = await cpm.spawn(CALCULATOR, Calculator, name=calc_name)
    slow = await cpm.spawn(SLOW, name=slow_name)
    chaos = await cpm.spawn(CHAOS, name=chaos_name)

    assert await calc.add(5, 3) == 8
    assert await calc.add(a=1.5, b=2) == 3.5  # keyword arguments
    assert await cpm.client.call(calc_name, "multiply", (), {"a": 6, "b": 7}) == 42
    assert await slow.echo({"nested": [1, "two", None], "bytes": b"\x00\xff"}) == {
        "nested": [1, "two", None],
        "bytes": b"\x00\xff",
    }
    assert (await slow.sleep(0.01, tag=7))["tag"] == 7
    doubled, pid = await chaos.work(21, ms=1)
    assert doubled == 42 and pid == next(w.pid for w in cpm.workers if w.service == chaos_name)

    # Errors cross the cluster like values.
    with pytest.raises(RemoteError, match="Division by zero") as info:
        await calc.divide(1, 0)
    assert info.value.type == "ValueError"
    with pytest.raises(MethodNotFound):
        await cpm.client.call(slow_name, "no_such_method")
    with pytest.raises(BadArguments, match="argument 'a' must be float"):
        await cpm.client.call(calc_name, "add", ("five", 3))

    # Many calls at once, to the three services (three nodes) from one client.
    results: dict[str, list[Any]] = {calc_name: [], slow_name: [], chaos_name: []}

    async def one(i: int) -> None:
        results[calc_name].append(await calc.add(i, 1))
        results[slow_name].append(await slow.echo(i))
        results[chaos_name].append((await chaos.work(i))[0])

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(one, i)
    assert sorted(results[calc_name]) == [i + 1 for i in range(30)]
    assert sorted(results[slow_name]) == list(range(30))
    assert sorted(results[chaos_name]) == [2 * i for i in range(30)]

    # Each service's stream really is on its own primary.
    for name in (calc_name, slow_name, chaos_name):
        node = cluster.primary_for(keys.calls(name))
        single = node.client()
        try:
            assert single.exists(keys.calls(name)) == 1, f"{keys.calls(name)} is not on {node}"
        finally:
            single.close()


# --- streaming ------------------------------------------------------------------------------------


async def test_streaming_on_the_cluster(cpm: ProcessManager, tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    svc = await cpm.spawn(STREAMER, dependencies={"marker": str(marker)})
    # 200 items: past the first window of 32, so the caller's credit (a hash in the slot) is used.
    assert [item async for item in svc.numbers(200)] == list(range(200))
    got = []
    with pytest.raises(RemoteError, match="broke after two"):
        async for item in svc.then_fail():
            got.append(item)
    assert got == [1, 2]
    ticks = []
    async for tick in svc.ticks():  # endless: leaving the loop must stop the producer
        ticks.append(tick)
        if len(ticks) == 3:
            break

    async def stopped() -> bool:
        return marker.exists()

    await eventually(stopped, 10, "the producer to stop")


# --- affinity --------------------------------------------------------------------------------------


async def test_calls_with_a_key_stick_to_one_worker(
    cluster: LocalCluster, cworkers: RoutedWorkers, namespace: str
) -> None:
    for _ in range(3):
        cworkers.start(CHAOS)
    cworkers.wait_registered("chaos", 3)
    async with ProcessManager(cluster.url, namespace=namespace) as pm:
        proxy = await pm.connect("chaos")
        owner: dict[str, int] = {}
        for k in range(12):
            keyed = with_options(proxy, key=f"user-{k}")
            pids = {(await keyed.work(k))[1] for _ in range(4)}
            pids.add((await pm.client.call("chaos", "work", (k,), key=f"user-{k}"))[1])
            assert len(pids) == 1, f"user-{k} was served by {pids}"
            owner[f"user-{k}"] = pids.pop()
    assert len(set(owner.values())) >= 2, owner  # the keys spread over the workers


# --- a worker killed mid-call --------------------------------------------------------------------


async def test_a_call_survives_its_worker_killed_mid_call(
    cluster: LocalCluster, cworkers: RoutedWorkers, namespace: str, keys: Keys, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    procs = {
        wid: cworkers.start(CHAOS, *FAST_FAILOVER, "--worker-id", wid, "--dep", f"log={json.dumps(str(log))}")
        for wid in ("a", "b")
    }
    cworkers.wait_registered("chaos", 2)

    home: Any = cluster.primary_for(keys.calls("chaos")).client()  # the node that holds the stream

    def holder() -> str | None:
        entries = home.xpending_range(keys.calls("chaos"), GROUP, "-", "+", 10)
        return entries[0]["consumer"].decode() if entries else None

    async with Client(cluster.url, namespace=namespace) as client:
        result: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                result.append(await client.call("chaos", "work", (21, 1500), timeout=20))

            tg.start_soon(call)
            first = procs.pop(str(await in_thread(wait_until, holder, 10, "the call delivered")))
            [second] = procs.values()
            killed_at = time.monotonic()
            cworkers.kill(first)
        failover = time.monotonic() - killed_at
    assert result == [[42, second.pid]]  # answered once, by the survivor
    # Claimed once the dead worker's heartbeat expired (1 s); the call itself takes 1.5 s.
    assert failover < 1.5 + 4.0, failover
    runs = sorted(log.read_text().splitlines())
    assert runs == sorted([f"21 {first.pid} 0", f"21 {second.pid} 0"])  # once on each worker
    assert holder() is None  # nothing left pending
    home.close()


# --- dead letters, listed and replayed through the CLI -------------------------------------------


@pytest.mark.slow
async def test_dead_letters_listed_and_replayed_with_the_cli(
    cluster: LocalCluster, cworkers: RoutedWorkers, namespace: str, tmp_path: Path
) -> None:
    marker = tmp_path / "allowed"
    procs = [cworkers.start(CHAOS, *FAST_FAILOVER) for _ in range(3)]
    cworkers.wait_registered("chaos", 3)
    async with Client(cluster.url, namespace=namespace) as client:
        with pytest.raises(DeadLettered, match=r"delivered 3 times \(max_deliveries 2\)"):
            await client.call("chaos", "crash_unless", (str(marker),), timeout=20)
    for p in procs:
        if p.poll() is not None:  # two deliveries, two workers gone
            cworkers.killed.add(p.pid)
    assert len(cworkers.killed) == 2

    def listing() -> list[dict[str, Any]]:
        done = titan(cluster.url, namespace, "dead-letters", "chaos", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    [letter] = listing()
    assert letter["method"] == "crash_unless" and letter["deliveries"] == 3
    marker.write_text("")
    replayed = titan(cluster.url, namespace, "dead-letters", "chaos", "--replay", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {"replayed": 1}
    await in_thread(wait_until, lambda: marker.read_text() == "ran\n", 15, "the replayed call to run")
    assert listing() == []


# --- rate limit and cache --------------------------------------------------------------------------


async def test_rate_limit_and_cache_on_the_cluster(cpm: ProcessManager, tmp_path: Path) -> None:
    svc = await cpm.spawn(DECORATED, dependencies={"store": str(tmp_path / "users.json")})
    # @rate_limit, service scope: a bucket in Redis, in the service's slot.
    admitted, refusal, elapsed = await until_refused(lambda: svc.per_user("a"))
    assert 2 <= admitted <= 2 + 2 * elapsed  # the burst of 2, then 2/s
    assert refusal.type == "titan.RateLimited" and 0 < refusal.retry_after <= 0.5
    assert await svc.per_user("b") == "b"  # another key, another bucket
    admitted, refusal, elapsed = await until_refused(svc.limited)
    assert 1 <= admitted <= 1 + 10 * elapsed

    # @cache(scope="service"): entries in Redis; a hit does not run the method.
    first = await svc.shared(1)
    assert await svc.shared(1) == first
    assert (await svc.run_counts())["shared"] == 1
    await cpm.client.invalidate_cache("decorated", "shared")  # a generation counter in the slot
    await svc.shared(1)
    await svc.shared(1)
    assert (await svc.run_counts())["shared"] == 2

    # invalidated_by: an update drops the cached read.
    await svc.update_user(1, "ada")
    assert (await svc.get_user(1))["name"] == "ada"
    assert (await svc.get_user(1))["name"] == "ada"
    assert (await svc.run_counts())["get_user"] == 1
    await svc.update_user(1, "grace")
    assert (await svc.get_user(1))["name"] == "grace"  # never the stale one
    assert (await svc.run_counts())["get_user"] == 2


# --- the CLI from a node that holds none of the service's keys ----------------------------------


@pytest.mark.parametrize("role", ["primary", "replica"])
def test_the_cli_from_a_node_without_the_services_keys(
    cluster: LocalCluster, cworkers: RoutedWorkers, namespace: str, keys: Keys, role: str
) -> None:
    cworkers.start(CALCULATOR)
    [wid] = cworkers.wait_registered("calculator", 1)
    primaries = cluster.primary_nodes()
    # Neither the primary of the service's slot nor its replica: this node holds none of its keys.
    node = next(
        n for n in cluster.nodes_without(keys.calls("calculator")) if (n in primaries) == (role == "primary")
    )
    url = node.url

    def run(*args: str) -> Any:
        done = titan(url, namespace, *args)
        assert done.returncode == 0, (args, done.stderr)
        return json.loads(done.stdout)

    [service] = run("services", "--json")
    assert service["service"] == "calculator"
    assert [w for v in service["versions"] for w in v["workers"]] == [wid]
    [worker] = run("workers", "--json")
    assert worker["worker_id"] == wid and worker["status"] == "ready"
    [report] = run("health", "--json")
    assert (report["service"], report["status"], report["healthy_workers"]) == ("calculator", "healthy", 1)
    assert run("call", "calculator", "add", "2", "3.5") == 5.5
    [queue] = run("queues", "--json")
    assert queue["service"] == "calculator" and queue["waiting"] == 0
    failed = titan(url, namespace, "call", "calculator", "divide", "1", "0")
    assert failed.returncode == 1 and "ValueError: Division by zero" in failed.stderr


# --- a primary killed under load -------------------------------------------------------------------


@dataclass
class Outcome:
    i: int
    started: float
    ended: float
    value: Any = None
    error: BaseException | None = None


class CallLoad:
    """Loops of calls that keep going whatever happens, each call timed; waited on through events."""

    def __init__(self, call: Callable[[int], Awaitable[Any]], loops: int = 4) -> None:
        self.call = call
        self.loops = loops
        self.outcomes: list[Outcome] = []
        self._stop = False
        self._changed = anyio.Event()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for k in range(self.loops):
                tg.start_soon(self._loop, k)

    def stop(self) -> None:
        self._stop = True

    async def _loop(self, k: int) -> None:
        i = k * 1_000_000
        while not self._stop:
            i += 1
            outcome = Outcome(i, time.monotonic(), 0.0)
            try:
                outcome.value = await self.call(i)
            except Exception as exc:  # judged afterwards: each must be a TitanError
                outcome.error = exc
            outcome.ended = time.monotonic()
            self.outcomes.append(outcome)
            self._changed.set()
            self._changed = anyio.Event()
            if outcome.error is not None:
                await anyio.sleep(0.05)  # pacing, not waiting: a call may fail at once, do not spin

    def ok_started_after(self, t: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is None and o.started >= t]

    async def wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            with anyio.fail_after(timeout):
                while not ready():
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what} not within {timeout} s: {self.summary()}") from None

    def summary(self) -> str:
        kinds = Counter(type(o.error).__name__ if o.error else "ok" for o in self.outcomes)
        return f"{len(self.outcomes)} calls: {dict(kinds)}"


MISTAKES = (BadArguments, MethodNotFound, BadRequest, PayloadTooLarge, EncodeError)
"""Errors that would mean the failover corrupted a request or a reply, not just delayed or lost it."""


async def failover_under_load(
    call: Callable[[int], Awaitable[Any]],
    kill: Callable[[], object],
    wait_promoted: Callable[[], object],
    check_value: Callable[[Outcome], bool],
) -> None:
    """Calls in loops; ``kill`` the primary; ``wait_promoted``; the service must answer again.

    Holds: every call either succeeds with the right value or raises a TitanError (not one of
    MISTAKES), none takes more than CALL_TIMEOUT + LATE_MARGIN; a call started after the
    promotion succeeds within RECOVERY_LIMIT of it; and once the service answers again, it keeps
    answering (every call started from 2 s after that succeeds; the load runs on 3 s at least).
    """
    load = CallLoad(call, loops=8)

    def back(since: float) -> float | None:
        """When the first call started at ``since`` or later succeeded."""
        return min((o.ended for o in load.ok_started_after(since)), default=None)

    def steady(since: float) -> bool:
        at = back(since)
        return at is not None and time.monotonic() > at + 3.0 and len(load.ok_started_after(since)) >= 50

    async with anyio.create_task_group() as tg:
        tg.start_soon(load.run)
        await load.wait_for(lambda: len(load.ok_started_after(0)) >= 100, 30, "100 calls before the kill")
        killed_at = time.monotonic()
        await in_thread(kill)
        await in_thread(wait_promoted)
        promoted_at = time.monotonic()
        await load.wait_for(
            lambda: steady(promoted_at), RECOVERY_LIMIT + CALL_TIMEOUT + 10, "the service steady again"
        )
        load.stop()
    outcomes = load.outcomes
    back_at = back(promoted_at)
    assert back_at is not None
    print(
        f"\nfailover: promoted {promoted_at - killed_at:.2f} s after the kill, answering again "
        f"{back_at - promoted_at:.2f} s after the promotion; {load.summary()}; slowest call "
        f"{max(o.ended - o.started for o in outcomes):.2f} s"
    )
    strange = [o.error for o in outcomes if o.error is not None and not isinstance(o.error, TitanError)]
    assert not strange, f"errors that are not TitanError: {strange[:5]!r}"
    mistaken = [o.error for o in outcomes if isinstance(o.error, MISTAKES)]
    assert not mistaken, f"requests or replies garbled by the failover: {mistaken[:5]!r}"
    wrong = [o for o in outcomes if o.error is None and not check_value(o)]
    assert not wrong, f"wrong answers: {wrong[:5]}"
    late = [o for o in outcomes if o.ended - o.started > CALL_TIMEOUT + LATE_MARGIN]
    assert not late, (
        f"calls past their timeout of {CALL_TIMEOUT} s: {[(o.ended - o.started, o.error) for o in late]}"
    )
    assert back_at - promoted_at < RECOVERY_LIMIT
    relapses = [o.error for o in outcomes if o.started > back_at + 2.0 and o.error is not None]
    assert not relapses, f"calls failed after the service was back: {relapses[:5]!r}"


async def chaos_pair(pm: ProcessManager) -> tuple[Any, list[int], Callable[[Outcome], bool]]:
    """Two chaos workers, a proxy, their pids, and whether an outcome is a right answer from one of them."""
    await pm.spawn(CHAOS)
    proxy = await pm.connect("chaos")
    await pm.spawn(CHAOS)
    pids = [w.pid for w in pm.workers]

    def right(o: Outcome) -> bool:
        return bool(o.value[0] == 2 * o.i and o.value[1] in pids)

    return proxy, pids, right


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("url_of", ["another node", "the killed node"])
async def test_a_primary_killed_under_load(
    cluster: LocalCluster, namespace: str, keys: Keys, url_of: str
) -> None:
    victim = cluster.primary_for(keys.calls("chaos"))
    # The URL callers and workers were given: a node not involved, or the very node that dies
    # (they must have learnt the others from it).
    url = victim.url if url_of == "the killed node" else cluster.nodes_without(keys.calls("chaos"))[0].url
    try:
        async with ProcessManager(url, namespace=namespace, default_timeout=CALL_TIMEOUT) as pm:
            recorder = Recorder(pm)
            proxy, pids, right = await chaos_pair(pm)
            promoted: list[ClusterNode] = []
            await failover_under_load(
                lambda i: with_options(proxy, timeout=CALL_TIMEOUT).work(i, 20),
                lambda: cluster.kill(victim),
                lambda: promoted.append(cluster.wait_promoted(victim, timeout=30)),
                right,
            )
            assert cluster.primary_for(keys.calls("chaos")) is promoted[0] is not victim
            # The same worker processes, never restarted: they followed the new primary by themselves.
            assert [w.pid for w in pm.workers] == pids
            assert all(w.process.returncode is None for w in pm.workers)
            assert not {"crashed", "restarted"} & set(recorder.kinds()), recorder.kinds()
        assert managed_workers() == []
    finally:
        await in_thread(cluster.heal)  # the old primary rejoins as a replica


# --- pools and autoscale --------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_pool_scales_on_the_cluster(cpm: ProcessManager) -> None:
    recorder = Recorder(cpm)
    scale = AutoScale(min=1, max=2, target_cpu=0.9, target_backlog=2, interval=0.3, cooldown=60)
    pool: Pool[Any] = await cpm.pool(POOLED, autoscale=scale, concurrency=1)
    assert pool.size == 1
    pids: list[int] = []
    async with anyio.create_task_group() as tg:

        async def one() -> None:
            pids.append(await pool.proxy.sleep(0.3))

        for _ in range(16):
            tg.start_soon(one)
        await recorder.wait_for("scaled", timeout=20)  # the backlog, read from the cluster, grew it
    assert len(pids) == 16
    assert pool.size == 2
    metrics = await eventually(lambda: _with_calls(pool, 16), 10, "16 calls in the metrics")
    assert metrics.workers == 2 and metrics.errors == 0
    await pool.scale(1)
    assert [await pool.proxy.sleep(0) for _ in range(3)] == [pool.workers[0].pid] * 3


# --- a password-protected cluster, and an ACL user ----------------------------------------------

PASSWORD = "titan-cluster-secret"
ACL_USER, ACL_PASSWORD = "titan", "titan-acl-secret"


@pytest.fixture(scope="module")
def secured_cluster() -> Iterator[LocalCluster]:
    """3 primaries, no replicas (cheaper), each asking for a password; and an ACL user on every node."""
    skip_without_cluster_binaries()
    acl = ["--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"]  # one word an argument
    with LocalCluster(primaries=3, replicas=0, password=PASSWORD, extra_args=acl) as c:
        yield c


async def test_a_password_protected_cluster(secured_cluster: LocalCluster, namespace: str) -> None:
    port = secured_cluster.nodes[1].port
    assert secured_cluster.url.startswith(f"redis://:{PASSWORD}@127.0.0.1:")
    acl_url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{port}"
    workers = RoutedWorkers(acl_url, namespace, secured_cluster.client)  # the worker as the ACL user
    try:
        workers.start(CALCULATOR)
        workers.wait_registered("calculator", 1)
        async with ProcessManager(secured_cluster.url, namespace=namespace) as pm:  # the default user
            calc = await pm.connect("calculator", Calculator)
            assert await calc.add(2, 3) == 5
            assert await calc.add(a=1, b=1) == 2
        with pytest.raises(RedisUnavailable) as refused:
            async with ProcessManager(f"redis://:wrong-password@127.0.0.1:{port}", namespace=namespace):
                pass
        assert "wrong-password" not in str(refused.value)  # the password never shows in a message
        done = titan(acl_url, namespace, "call", "calculator", "multiply", "6", "7")
        assert done.returncode == 0 and json.loads(done.stdout) == 42, done.stderr
    finally:
        workers.close()


async def test_the_acl_rules_work_on_a_cluster(secured_cluster: LocalCluster, namespace: str) -> None:
    """The caller and worker rules of ``titan acl``, set on every node: a worker serves, a caller calls
    (reading the slot map needs its cluster permissions) and still cannot write the registry."""
    from .test_client import caller_acl, worker_acl

    admin = secured_cluster.client()
    admin.sadd(Keys(namespace).users("calculator"), "caller")  # registered, as titan acl --apply does
    admin.close()
    for node in secured_cluster.nodes:
        node.ask("ACL", "SETUSER", "caller", ">callerpass", *caller_acl(namespace, "calculator"))
        node.ask("ACL", "SETUSER", "worker", ">workerpass", *worker_acl(namespace, "calculator"))
    port = secured_cluster.nodes[2].port
    workers = RoutedWorkers(f"redis://worker:workerpass@127.0.0.1:{port}", namespace, secured_cluster.client)
    try:
        workers.start(CALCULATOR)
        workers.wait_registered("calculator", 1)
        async with ProcessManager(f"redis://caller:callerpass@127.0.0.1:{port}", namespace=namespace) as pm:
            calc = await pm.connect("calculator", Calculator)
            assert [await calc.add(i, 1) for i in range(5)] == [1, 2, 3, 4, 5]
            with pytest.raises(Exception, match=r"NOPERM|permission"):
                await pm.client.redis.hset(Keys(namespace).services, "calculator", "{}")
    finally:
        workers.close()


# --- a TLS-only cluster, reached with rediss:// -------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """3 primaries, no replicas, TLS only (no plain port): clients, cluster bus and replication."""
    skip_without_cluster_binaries()
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    folder = tmp_path_factory.mktemp("tls")
    tls = TlsFiles.make(folder)  # a CA, and a certificate it signed for 127.0.0.1
    with LocalCluster(primaries=3, replicas=0, tls=tls) as c:
        yield c


async def test_rediss_to_a_tls_cluster_from_a_node_without_the_service(
    tls_cluster: LocalCluster, namespace: str, keys: Keys
) -> None:
    """``rediss://`` works on a cluster as on one node. Workers, callers and the CLI get the
    URL of a node that does not serve the service's slot: every connection they open to the other
    nodes (the slot map's probes, the channels, redis-py's cluster client) must speak TLS and trust
    the URL's ``ssl_ca_certs`` too."""
    ca = tls_cluster.tls.ca if tls_cluster.tls else ""
    home = tls_cluster.primary_for(keys.calls("calculator"))
    seed = tls_cluster.nodes_without(keys.calls("calculator"))[0]
    url = seed.url
    assert url.startswith(f"rediss://127.0.0.1:{seed.port}?ssl_ca_certs=") and url.endswith(ca)
    workers = RoutedWorkers(url, namespace, tls_cluster.client)
    try:
        workers.start(CALCULATOR)
        [wid] = workers.wait_registered("calculator", 1)
        async with ProcessManager(url, namespace=namespace, default_timeout=10.0) as pm:
            calc = await pm.connect("calculator", Calculator)
            assert await calc.add(2, 3) == 5
            assert await pm.client.call("calculator", "multiply", (), {"a": 6, "b": 7}) == 42
            results: list[float] = []

            async def one(i: int) -> None:
                results.append(await calc.add(i, 1))

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
            assert sorted(results) == [i + 1 for i in range(20)]
        single = home.client()  # the stream lives on the other node, reached over TLS
        try:
            assert single.exists(keys.calls("calculator")) == 1
        finally:
            single.close()

        done = titan(url, namespace, "services", "--json")
        assert done.returncode == 0, done.stderr
        [service] = json.loads(done.stdout)
        assert service["service"] == "calculator"
        assert [w for v in service["versions"] for w in v["workers"]] == [wid]
        done = titan(url, namespace, "call", "calculator", "add", "2", "3.5")
        assert done.returncode == 0 and json.loads(done.stdout) == 5.5, done.stderr

        # TLS only: no plain connection, and no TLS one that does not trust the CA.
        for wrong in (f"redis://127.0.0.1:{seed.port}", f"rediss://127.0.0.1:{seed.port}"):
            with pytest.raises(RedisUnavailable):
                async with ProcessManager(wrong, namespace=namespace):
                    pass
    finally:
        workers.close()


# --- a failover before a service's first call, a slot map a sibling read, a database in the URL ---


@pytest.mark.timeout(120)
async def test_a_service_first_called_after_its_primary_failed_over(
    cluster: LocalCluster, namespace: str, keys: Keys
) -> None:
    """The client read the slot map before the failover and had no link to that node yet: its first
    call must follow the promotion, not fail for ever against the dead node's address."""
    seed = cluster.nodes_without(keys.calls("slow"))[0]
    victim = cluster.primary_for(keys.calls("slow"))
    try:
        async with ProcessManager(seed.url, namespace=namespace, default_timeout=5.0) as pm:
            await pm.client.live_workers("calculator")  # connected: the map is read
            cluster.kill(victim)
            await in_thread(cluster.wait_promoted, victim)
            await pm.spawn(SLOW)
            slow = await pm.connect("slow")
            assert await slow.echo("first") == "first"
    finally:
        await in_thread(cluster.heal)


@pytest.mark.timeout(120)
async def test_a_channel_follows_a_map_its_sibling_read(cluster: LocalCluster, keys: Keys) -> None:
    """Two channels of one slot; after a failover one of them reads the new map: the other goes to
    the new primary before its next command, instead of failing first against the old one."""
    key = keys.calls("calculator")
    topology = await discover(cluster.url)
    first, second = await Channel.open(topology, key), await Channel.open(topology, key)
    victim = cluster.primary_for(key)
    try:
        assert await second.execute("PING") == b"PONG"
        cluster.kill(victim)
        promoted = await in_thread(cluster.wait_promoted, victim)
        with pytest.raises(rexc.ConnectionError):
            await first.execute("PING")  # the dead node: this one notices
        await topology.refresh()
        assert await second.execute("PING") == b"PONG"  # first try, on the new primary
        assert second.address == ("127.0.0.1", promoted.port)
    finally:
        await first.aclose()
        await second.aclose()
        await in_thread(cluster.heal)


async def test_a_cluster_url_with_a_database_number_is_a_clear_error(cluster: LocalCluster) -> None:
    for url in (f"{cluster.url}/1", f"{cluster.url}?db=2"):
        with pytest.raises(ConfigError, match="only database 0"):
            await discover(url)


async def test_clients_made_after_the_urls_node_went_down_reach_the_cluster_by_the_nodes_it_knows() -> None:
    """A worker learns the cluster's nodes when it starts; the clients it makes later (the heartbeat's
    own among them) must not depend on the one node its URL names being up then."""
    skip_without_cluster_binaries()
    with LocalCluster(primaries=3, replicas=1) as c:
        seed = c.replicas_of(c.primary_nodes()[0])[0]  # the cluster keeps every slot without it
        topology = await discover(seed.url)
        seed.stop(kill=True)
        sync = topology.sync_client(decode_responses=False, socket_timeout=2, socket_connect_timeout=2)
        try:
            sync.set("seed-down", "sync")
            assert sync.get("seed-down") == b"sync"
        finally:
            sync.close()
        client = topology.client(decode_responses=False, socket_timeout=2, socket_connect_timeout=2)
        try:
            await client.set("seed-down", "async")
            assert await client.get("seed-down") == b"async"
        finally:
            await client.aclose()
        unreachable = rexc.RedisClusterUnreachableError("Redis Cluster cannot be connected")
        assert isinstance(titan_error(unreachable, "serve"), RedisUnavailable)
