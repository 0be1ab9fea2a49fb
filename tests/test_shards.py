"""A service sharded over several slots: its calls spread over K streams, every worker reads them all.

Real redis-servers, real worker processes. The single-Redis tests show the behaviour (spreading,
every kind of call on a sharded service, a worker killed on a shard, a refused mismatch); the
cluster test shows the point of it: the shards of one service on three primaries.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import redis as sync_redis

from titan_broker import (
    Client,
    ConfigError,
    DeadLettered,
    ProcessManager,
    RemoteError,
    TitanError,
    WorkerOptions,
    process,
)
from titan_broker._wire.keys import GROUP, Keys, shard_scope, shard_scopes
from titan_broker.testing._local_cluster import LocalCluster

from .conftest import (
    CHAOS,
    FAST_FAILOVER,
    SERVICES,
    RoutedWorkers,
    Workers,
    eventually,
    in_thread,
    managed_workers,
    run_log,
    skip_without_cluster_binaries,
    titan,
    wait_until,
)
from .worker_harness import EDGE_V1, EDGE_V2

pytestmark = pytest.mark.anyio

TASKS = SERVICES / "tasks.py"
STREAMER = SERVICES / "streamer.py"
TICKER = SERVICES / "ticker.py"
K = 3


def added(client: Any, stream: str) -> int:
    """How many entries were ever added to ``stream`` (acknowledged entries are deleted)."""
    if not client.exists(stream):
        return 0
    return int(client.xinfo_stream(stream)["entries-added"])


@pytest.fixture
def sync(redis_url: str) -> Iterator[sync_redis.Redis]:
    client = sync_redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """3 primaries, each with a replica, for the module's cluster cases."""
    skip_without_cluster_binaries()
    with LocalCluster(primaries=3, replicas=1) as c:
        yield c


@dataclass
class Deployment:
    """Where a case runs: a manager, a sync client that reads any key, and the service's name."""

    pm: ProcessManager
    sync: Any
    name: str
    cluster: LocalCluster | None
    url: str

    def workers(self) -> Workers:
        """``titan-worker run`` processes for this deployment (close them)."""
        if self.cluster is None:
            return Workers(self.url, self.pm.client.namespace)
        return RoutedWorkers(self.url, self.pm.client.namespace, self.cluster.client)


@pytest.fixture(params=["single", "cluster"])
async def where(request: pytest.FixtureRequest, redis_url: str, namespace: str) -> AsyncIterator[Deployment]:
    """One Redis, or the cluster with the service named so that its K shards are on K primaries."""
    keys = Keys(namespace)
    cluster: LocalCluster | None = None
    if request.param == "cluster":
        cluster = request.getfixturevalue("cluster")
        url, sync = cluster.url, cluster.client()
        name = next(
            f"tasks-{n}"
            for n in range(1000)
            if len({cluster.primary_for(keys.calls(s)).port for s in shard_scopes(f"tasks-{n}", K)}) == K
        )
    else:
        url, sync, name = redis_url, sync_redis.Redis.from_url(redis_url), "tasks"
    try:
        async with ProcessManager(url, namespace=namespace, default_timeout=15.0) as pm:
            yield Deployment(pm, sync, name, cluster, url)
        assert managed_workers() == [], "a worker outlived its ProcessManager"
    finally:
        sync.close()


def test_shard_scopes_keep_the_first_shard_as_the_unsharded_layout() -> None:
    keys = Keys("t")
    assert shard_scopes("ingest", 1) == ["ingest"]
    assert shard_scopes("ingest", 3) == ["ingest", "ingest#1", "ingest#2"]
    assert keys.calls(shard_scope("ingest", 0)) == "t:{ingest}:calls"
    assert keys.calls(shard_scope("ingest", 2)) == "t:{ingest#2}:calls"
    assert Keys.service_of(keys.reply("ingest#2", "c1")) == "ingest"
    assert Keys.scope_of(keys.reply("ingest#2", "c1")) == "ingest#2"


@pytest.mark.parametrize("bad", [0, -1, 65, 2.5, "3", True])
def test_a_bad_shard_count_is_refused_naming_it(bad: Any) -> None:
    with pytest.raises(ConfigError, match="shards must be a whole number from 1 to 64"):
        process(name="x", shards=bad)
    with pytest.raises(ConfigError, match="shards must be a whole number from 1 to 64"):
        WorkerOptions(shards=bad)


async def test_calls_spread_over_every_shard_and_each_is_answered_once(
    where: Deployment, keys: Keys, tmp_path: Path
) -> None:
    pm, sync, name = where.pm, where.sync, where.name
    log = tmp_path / "runs.log"
    options = WorkerOptions(shards=K, concurrency=8)
    for _ in range(2):
        await pm.spawn(TASKS, dependencies={"log": str(log)}, name=name, options=options)
    # The first shard's config tells callers the count; the limits are in every shard's own slot.
    assert sync.hget(keys.config(name), "shards") == b"3"
    assert "shards" not in sync.hget(keys.services, name).decode()
    for scope in shard_scopes(name, K):
        assert sync.hget(keys.config(scope), "max_backlog") == b"3334"  # 10,000 shared evenly
    client = pm.client
    await client.call(name, "add", (0, 0))
    await eventually(functools.partial(_knows_shards, client, name), what="the shard count")

    results: dict[int, float] = {}

    async def one(i: int) -> None:
        results[i] = await client.call(name, "add", (i, 1), {"tag": f"t{i}"})

    # 30 waves of 10: the calls of one turn of the event loop go to one shard (one batch), and
    # the next turn's to the next shard.
    for wave in range(30):
        async with anyio.create_task_group() as tg:
            for i in range(wave * 10, wave * 10 + 10):
                tg.start_soon(one, i)
    assert results == {i: i + 1 for i in range(300)}
    per_shard = [added(sync, keys.calls(scope)) for scope in shard_scopes(name, K)]
    assert sum(per_shard) >= 300 and min(per_shard) >= 90, per_shard  # round-robin: ~100 each
    runs = [line[1] for line in run_log(log) if line[0] == "add" and line[1] != "-"]
    assert sorted(runs) == sorted(f"t{i}" for i in range(300)), "a call ran twice, or not at all"
    # Both workers read every shard: each served some of each.
    consumers = [sync.xinfo_consumers(keys.calls(scope), GROUP) for scope in shard_scopes(name, K)]
    assert all(len(found) == 2 for found in consumers), consumers
    if where.cluster is not None:  # the point of it: one service's calls on three primaries
        primaries = {where.cluster.primary_for(keys.calls(scope)).port for scope in shard_scopes(name, K)}
        assert len(primaries) == K


async def _knows_shards(client: Client, service: str = "tasks", shards: int = K) -> bool:
    """Whether the client has read the service's shard count (each call looks, in the background,
    when it has not or read it long enough ago: so does this)."""
    client._shards.next_scope(service)
    return client._shards.known(service) == shard_scopes(service, shards)


async def test_every_kind_of_call_works_on_a_sharded_service(
    where: Deployment, keys: Keys, tmp_path: Path
) -> None:
    pm, sync = where.pm, where.sync
    log = tmp_path / "runs.log"
    options = WorkerOptions(shards=K, concurrency=8)
    await pm.spawn(TASKS, dependencies={"log": str(log)}, options=options)
    await pm.spawn(STREAMER, options=options)
    await pm.spawn(TICKER, dependencies={"log": str(log)}, options=options)
    client = pm.client
    for service in ("tasks", "streamer"):
        await eventually(functools.partial(_knows_shards, client, service), what="the shard count")
    # Each kind K times in a row (one turn of the event loop each): round-robin sends it to every shard.
    for _ in range(K):
        assert [n async for n in client.stream("streamer", "numbers", (40,))] == list(range(40))
    for i in range(K):
        assert await client.call("tasks", "flaky", (1, f"f{i}")) == "ok after 2"  # @retry: on its shard
    for i in range(K):
        with pytest.raises(RemoteError, match="not a ConnectionError"):
            await client.call("tasks", "wrong_error", (f"w{i}",))
    # Calls with a key or a delay, and jobs, go to the first shard (the workers' own streams, the
    # delayed set and the jobs are there).
    for i in range(K):
        assert await client.call("tasks", "add", (i, 2), key=f"user-{i}") == i + 2
        assert await client.call("tasks", "add", (i, 3), delay=0.05) == i + 3
        job_id = await client.submit("tasks", "add", (i, 4))
        assert await client.job(job_id).result(timeout=10) == i + 4
    # Every shard's stream had calls of each kind; the retries waited in their own shard's set.
    for scope in shard_scopes("tasks", K):
        assert added(sync, keys.calls(scope)) >= 3, scope
        assert added(sync, keys.calls(scope.replace("tasks", "streamer"))) >= 1, scope
        assert sync.exists(keys.delayed(scope)) == 0  # each retry was moved back onto its stream
    # A periodic method's ticks run on the first shard, once each.
    await eventually(lambda: _runs(log, "tick", 2), what="two ticks")
    queued = sync.zcard(keys.jobs("ticker"))  # each tick's run is a job, queued once
    ticks = await _runs(log, "tick", 0) or []
    assert 2 <= len(ticks) <= queued, f"{len(ticks)} runs of {queued} ticks queued: one ran twice"
    # An abandoned stream stops its producer whatever its shard.
    for _ in range(K):
        async with aclosing(client.stream("streamer", "ticks")) as ticks:
            async for n in ticks:
                if n >= 3:
                    break


async def test_a_worker_killed_mid_call_on_a_shard_leaves_its_calls_to_another(
    where: Deployment, tmp_path: Path
) -> None:
    pm, name = where.pm, where.name
    log = tmp_path / "runs.log"
    options = WorkerOptions(shards=K, concurrency=8, heartbeat_interval=0.2, heartbeat_ttl=1.0)
    await pm.spawn(TASKS, dependencies={"log": str(log)}, name=name, options=options, restart=None)
    client = pm.client
    await eventually(functools.partial(_knows_shards, client, name), what="the shard count")
    first = next(w for w in pm.workers if w.service == name)
    outcomes: dict[str, str] = {}

    async def one(i: int) -> None:
        outcomes[f"s{i}"] = await client.call(name, "slow", (1.0, f"s{i}"), timeout=20)

    async with anyio.create_task_group() as tg:
        for i in range(2 * K):  # one at a time (each in a turn of its own): every shard holds two
            tg.start_soon(one, i)
            await anyio.lowlevel.checkpoint()
        await eventually(lambda: _started(log, 2 * K), what="every call to start")
        await pm.spawn(TASKS, dependencies={"log": str(log)}, name=name, options=options, restart=None)
        os.kill(first.pid, signal.SIGKILL)
    assert outcomes == {f"s{i}": f"s{i}" for i in range(2 * K)}
    ends = [line[1] for line in run_log(log) if line[0] == "end"]
    assert sorted(ends) == sorted(outcomes), "each call ended once, on the surviving worker"


async def _runs(log: Path, what: str, count: int) -> list[str] | None:
    """The times of the runs of ``what`` in the log, once there are ``count``."""
    lines = await anyio.to_thread.run_sync(lambda: run_log(log) if log.exists() else [])
    runs = [line[3] for line in lines if line[0] == what]
    return runs if len(runs) >= count else None


async def _started(log: Path, count: int) -> bool:
    lines = await anyio.to_thread.run_sync(lambda: run_log(log) if log.exists() else [])
    return sum(1 for line in lines if line[0] == "start") >= count


async def test_a_worker_with_another_shard_count_is_refused(pm: ProcessManager, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    await pm.spawn(TASKS, dependencies={"log": str(log)}, options=WorkerOptions(shards=K, concurrency=8))
    with pytest.raises(Exception, match=r"served with shards=3 by 1 live worker.*this worker has shards=2"):
        await pm.spawn(
            TASKS,
            dependencies={"log": str(log)},
            options=WorkerOptions(shards=2, concurrency=8),
            restart=None,
        )
    assert await pm.client.call("tasks", "add", (1, 1)) == 2


async def test_dead_letters_of_a_shard_are_listed_replayed_to_it_and_purged(
    where: Deployment, keys: Keys, namespace: str, tmp_path: Path
) -> None:
    workers = where.workers()
    try:
        await _dead_letters_of_shards(where, workers, keys, namespace, tmp_path)
    finally:
        workers.close()


async def _dead_letters_of_shards(
    where: Deployment, workers: Workers, keys: Keys, namespace: str, tmp_path: Path
) -> None:
    pm, redis_url = where.pm, where.url
    client = pm.client
    markers = [tmp_path / f"allowed-{i}" for i in range(K)]
    for i, marker in enumerate(markers):  # K calls in a row: one per shard, each killing two workers
        for _ in range(2 if i else 3):
            workers.start(CHAOS, *FAST_FAILOVER, "--shards", str(K))
        await in_thread(workers.wait_registered, "chaos", 3)
        await eventually(functools.partial(_knows_shards, client, "chaos"), what="the shard count")
        with pytest.raises(DeadLettered):
            await client.call("chaos", "crash_unless", (str(marker),), timeout=30)
        workers.killed.update(proc.pid for proc in workers.procs if proc.poll() is not None)  # by the call
    letters = await pm.dead_letters("chaos")
    assert sorted(letter.arguments[0][0] for letter in letters) == sorted(map(str, markers))
    # Each in its own shard's dead letters, its id naming the shard after the first.
    for scope in shard_scopes("chaos", K):
        assert await client.redis.xlen(keys.dead(scope)) == 1, scope
    assert sorted(letter.id.partition("#")[2] for letter in letters) == ["", "1", "2"]
    shown = json.loads(titan(redis_url, namespace, "queues", "--json").stdout)
    [row] = [r for r in shown if r["service"] == "chaos"]
    assert row["dead_letters"] == K and [s["dead_letters"] for s in row["shards"]] == [1] * K
    assert [s["service"] for s in row["shards"]] == shard_scopes("chaos", K)
    # Replayed, each goes back to its own shard's stream (its reply key is in that slot) and runs.
    for marker in markers:
        marker.write_text("")
    chosen = [letter.id for letter in letters if letter.id.endswith("#2")]
    assert await pm.replay_dead_letters("chaos", chosen) == 1
    await in_thread(wait_until, lambda: markers_ran(markers) == 1, 15, "the replayed call to run")
    assert await pm.replay_dead_letters("chaos") == K - 1
    await in_thread(wait_until, lambda: markers_ran(markers) == K, 15, "the replayed calls to run")
    assert await pm.dead_letters("chaos") == []
    # Purged by id, on the right shard.
    await client.redis.xadd(keys.calls("chaos#1"), {b"junk": b"\xff"})
    [junk] = await in_thread(
        wait_until, lambda: anyio.from_thread.run(pm.dead_letters, "chaos"), 10, "a letter"
    )
    assert junk.id.endswith("#1") and "unanswerable request" in junk.reason
    assert await pm.purge_dead_letters("chaos", [junk.id]) == 1
    assert await pm.dead_letters("chaos") == []


def markers_ran(markers: list[Path]) -> int:
    return sum(1 for marker in markers if marker.read_text() == "ran\n")


async def test_calls_to_the_other_shards_go_on_while_one_primary_fails_over(
    cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    """One shard's primary killed under load: its calls wait for the promotion (or time out), the
    other shards' calls never stop (on a cluster that serves the slots it still covers:
    ``cluster-require-full-coverage no``; under Redis's default every node refuses commands until
    the promotion, the shards of every service alike)."""
    for node in cluster.nodes:
        node.ask("CONFIG", "SET", "cluster-require-full-coverage", "no")
    keys = Keys(namespace)
    name = next(
        f"hot-{n}"
        for n in range(1000)
        if len({cluster.primary_for(keys.calls(s)).port for s in shard_scopes(f"hot-{n}", K)}) == K
    )
    log = tmp_path / "runs.log"
    options = WorkerOptions(shards=K, concurrency=8)
    async with ProcessManager(cluster.url, namespace=namespace, default_timeout=15.0) as pm:
        for _ in range(2):
            await pm.spawn(TASKS, dependencies={"log": str(log)}, name=name, options=options)
        client = pm.client
        await eventually(functools.partial(_knows_shards, client, name), what="the shard count")
        victim = cluster.primary_for(keys.calls(shard_scope(name, 1)))
        answered: list[float] = []  # when each call was answered (event loop time)
        failed: list[str] = []
        stop = anyio.Event()

        async def caller(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    await client.call(name, "add", (i, n), timeout=2.0)
                    answered.append(anyio.current_time())
                except TitanError as exc:  # that shard's calls: CallTimeout, RedisUnavailable, CallLost
                    failed.append(type(exc).__name__)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(caller, i)
            await eventually(lambda: _at_least(answered, 100), what="calls before the fault")
            killed_at = anyio.current_time()
            await anyio.to_thread.run_sync(cluster.kill, victim)
            await anyio.to_thread.run_sync(cluster.wait_promoted, victim)
            promoted_at = anyio.current_time()
            await eventually(lambda: _at_least([t for t in answered if t > promoted_at], 100), what="after")
            stop.set()
        try:
            # While the shard's primary was down and until its replica took over, calls to the two
            # other shards were answered all along: no gap of more than a second without an answer.
            during = sorted(t for t in answered if killed_at <= t <= promoted_at)
            marks = [killed_at, *during, promoted_at]
            gaps = [b - a for a, b in itertools.pairwise(marks)]
            # A stop of every shard would leave a gap as long as the failover; on a loaded 2-core
            # machine, a pause of a second or so can happen anyway.
            window = promoted_at - killed_at
            assert max(gaps) < max(1.5, window / 2), (
                f"no answer for {max(gaps):.1f} s of a {window:.1f} s failover ({len(during)} answered)"
            )
        finally:
            await anyio.to_thread.run_sync(cluster.heal)
            for node in cluster.nodes:
                node.ask("CONFIG", "SET", "cluster-require-full-coverage", "yes")


async def _at_least(values: list[float], count: int) -> bool:
    return len(values) >= count


async def test_a_call_to_one_shard_never_waits_behind_another_shards_read(
    pm: ProcessManager, tmp_path: Path
) -> None:
    """Each shard's read loop always holds a slot of its own: a call to any shard is taken at once,
    not when another shard's blocked read ends (read_block, 1 s)."""
    log = tmp_path / "runs.log"
    await pm.spawn(TASKS, dependencies={"log": str(log)}, options=WorkerOptions(shards=K, concurrency=K))
    client = pm.client
    await eventually(functools.partial(_knows_shards, client, "tasks"), what="the shard count")
    took = []
    for i in range(4 * K):  # one at a time, each in a turn of its own: every shard in turn
        started = anyio.current_time()
        assert await client.call("tasks", "add", (i, 1)) == i + 1
        took.append(anyio.current_time() - started)
    assert max(took) < 0.5, [round(t, 3) for t in took]


async def test_a_rolling_upgrade_hands_each_shards_calls_to_the_new_version(
    workers: Workers, pm: ProcessManager
) -> None:
    """A call for a method only the new version has, read by an old worker on any shard, is handed
    to a new worker in that shard (its reply key is there) and answered by it."""
    workers.start(EDGE_V1, "--shards", str(K))
    v2 = workers.start(EDGE_V2, "--shards", str(K))
    await in_thread(workers.wait_registered, "edge-upgrade", 2)
    client = pm.client
    await eventually(functools.partial(_knows_shards, client, "edge-upgrade"), what="the shard count")
    outcomes: dict[int, Any] = {}

    async def one(i: int) -> None:
        try:
            outcomes[i] = await client.call("edge-upgrade", "new_method", (i,), timeout=20)
        except TitanError as exc:
            outcomes[i] = exc

    for wave in range(4 * K):  # each wave to the next shard, read by either worker
        async with anyio.create_task_group() as tg:
            for i in range(wave * 5, wave * 5 + 5):
                tg.start_soon(one, i)
    assert outcomes == {i: [i, v2.pid] for i in range(20 * K)}


async def test_a_burst_to_one_shard_runs_on_every_slot(pm: ProcessManager, tmp_path: Path) -> None:
    """The calls of one turn of the event loop go to one shard: the other shards' idle reads hold no
    slot, so the burst runs on every slot of the worker at once."""
    log = tmp_path / "runs.log"
    await pm.spawn(TASKS, dependencies={"log": str(log)}, options=WorkerOptions(shards=4, concurrency=4))
    client = pm.client
    await eventually(functools.partial(_knows_shards, client, "tasks", 4), what="the shard count")
    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for i in range(8):  # two rounds of 1 s on 4 slots
            tg.start_soon(functools.partial(client.call, "tasks", "slow", (1.0, f"b{i}"), timeout=20))
    took = anyio.current_time() - started
    assert took < 3.5, f"8 calls of 1 s on 4 slots took {took:.1f} s"


async def test_a_dead_workers_calls_on_a_shard_are_taken_over_together(
    pm: ProcessManager, tmp_path: Path
) -> None:
    """Reclaiming takes as many calls as there are free slots, whatever the shard's read asks for."""
    log = tmp_path / "runs.log"
    options = WorkerOptions(shards=4, concurrency=8, heartbeat_interval=0.5, heartbeat_ttl=1.0)
    await pm.spawn(TASKS, dependencies={"log": str(log)}, options=options, restart=None)
    client = pm.client
    await eventually(functools.partial(_knows_shards, client, "tasks", 4), what="the shard count")
    first = next(w for w in pm.workers if w.service == "tasks")
    ended: dict[str, float] = {}

    async def one(i: int) -> None:
        await client.call("tasks", "slow", (2.0, f"r{i}"), timeout=30)
        ended[f"r{i}"] = anyio.current_time()

    async with anyio.create_task_group() as tg:
        for i in range(8):  # one turn: one shard
            tg.start_soon(one, i)
        await eventually(lambda: _started(log, 8), what="every call to start")
        os.kill(first.pid, signal.SIGKILL)
        killed = anyio.current_time()
        await pm.spawn(TASKS, dependencies={"log": str(log)}, options=options, restart=None)
    after = sorted(round(t - killed, 2) for t in ended.values())
    # Dead after 1 s (its TTL) while the next worker starts, all claimed at its first look, run
    # again for 2 s; claimed one per look (0.5 s), the last would end 3.5 s later.
    assert after[-1] - after[0] < 1.5, f"the 8 calls taken over ended at {after} s after the kill"


async def test_the_shard_count_is_checked_and_registered_in_one_step(
    pm: ProcessManager, keys: Keys, sync: sync_redis.Redis
) -> None:
    """register.lua refuses a count other than the live workers' (two workers starting together,
    or one whose record lapsed coming back), and nothing outside the service's slot can change what
    callers read."""
    from titan_worker.liveness import _REGISTER

    record = keys.worker("tasks", "a")
    sync.hset(record, "status", "ready")  # a live worker of the service...
    sync.sadd(keys.workers("tasks"), "a")
    sync.hset(keys.config("tasks"), "shards", "3")  # ...registered with 3 shards
    registry = [keys.worker("tasks", "b"), keys.workers("tasks"), keys.affinity("tasks"),
                keys.config("tasks"), keys.idle("tasks")]  # fmt: skip
    args = ["b", 5000, keys.worker("tasks", ""), 100, 3, "status", "ready"]
    with pytest.raises(sync_redis.ResponseError, match="TITANSHARDS 3 a"):
        _REGISTER.run_sync(sync, registry, [2, *args])
    assert sync.exists(keys.worker("tasks", "b")) == 0 and sync.hget(keys.config("tasks"), "shards") == b"3"
    assert _REGISTER.run_sync(sync, registry, [3, *args]) == 1  # the same count: registered
    sync.delete(record, keys.worker("tasks", "b"))  # no live worker: a new count is taken
    assert _REGISTER.run_sync(sync, registry, [1, *args]) == 1
    assert sync.hget(keys.config("tasks"), "shards") is None  # one shard: the unsharded layout
    # Callers read the count in the service's own slot: the directory, which every service's
    # workers write, cannot send them to shards nobody reads.
    sync.hset(keys.config("tasks"), "shards", "3")
    sync.hset(keys.services, "tasks", '{"name": "tasks", "shards": 256}')
    await pm.client._shards.read("tasks")
    assert pm.client._shards.known("tasks") == shard_scopes("tasks", 3)


async def test_fewer_shards_are_refused_while_the_dropped_ones_hold_calls(
    pm: ProcessManager, keys: Keys, sync: sync_redis.Redis, tmp_path: Path
) -> None:
    sync.hset(keys.config("tasks"), "shards", "3")
    sync.xadd(keys.calls("tasks#2"), {"left": "behind"})
    log = tmp_path / "runs.log"
    with pytest.raises(Exception, match=r"had shards=3: its shard 2 still hold 1 call"):
        await pm.spawn(TASKS, dependencies={"log": str(log)}, options=WorkerOptions(shards=2), restart=None)
    sync.delete(keys.calls("tasks#2"))
    await pm.spawn(TASKS, dependencies={"log": str(log)}, options=WorkerOptions(shards=2))
    assert sync.hget(keys.config("tasks"), "shards") == b"2"


@pytest.mark.parametrize("name", ["tasks#1", "a}b{c", "x*", ""])
async def test_a_call_to_a_name_that_cannot_be_a_service_is_refused_before_anything_is_sent(
    pm: ProcessManager, sync: sync_redis.Redis, keys: Keys, name: str
) -> None:
    before = set(sync.keys(f"{keys.namespace}:*"))
    for attempt in (
        pm.client.call(name, "add", (1, 2), timeout=1),
        pm.client.submit(name, "add", (1, 2), timeout=1),
    ):
        with pytest.raises(ConfigError, match="service name"):
            await attempt
    with pytest.raises(ConfigError, match="service name"):
        [n async for n in pm.client.stream(name, "numbers", (3,), timeout=1)]
    assert set(sync.keys(f"{keys.namespace}:*")) == before


async def test_a_call_is_never_handed_to_a_shard_stream_nobody_reads(
    pm: ProcessManager, keys: Keys, sync: sync_redis.Redis
) -> None:
    """On a shard after the first the target's record is in another slot: handoff.lua hands over
    only while the target's own stream in that shard exists (a dead worker's is deleted by its
    rescue, which no later sweep would find again)."""
    from titan_worker.handoff import _HANDOFF

    stream, own = keys.calls("tasks#1"), keys.worker_calls("tasks#1", "b")
    sync.xgroup_create(stream, GROUP, id="0", mkstream=True)
    entry = sync.xadd(stream, {"m": "new_method"})
    sync.xreadgroup(GROUP, "a", {stream: ">"})  # worker a holds it
    assert _HANDOFF.run_sync(sync, [stream, own], [entry, GROUP, "a"]) == -1  # b's stream is gone
    assert sync.xpending(stream, GROUP)["pending"] == 1 and sync.exists(own) == 0
    sync.xgroup_create(own, GROUP, id="0", mkstream=True)  # b started: its stream is there
    assert _HANDOFF.run_sync(sync, [stream, own], [entry, GROUP, "a"]) == 1
    assert sync.xlen(own) == 1 and sync.xpending(stream, GROUP)["pending"] == 0


@pytest.mark.parametrize("bad", ["5-0#1x", "5-0#²", "5-0#0", "junk", "5-0 "])
async def test_a_dead_letter_id_that_is_not_one_is_refused_naming_it(
    pm: ProcessManager, keys: Keys, sync: sync_redis.Redis, bad: str
) -> None:
    sync.xadd(keys.dead("tasks"), {"reason": "x"}, id="5-0")
    with pytest.raises(TitanError, match="is not a dead letter id of 'tasks'"):
        await pm.purge_dead_letters("tasks", [bad])
    with pytest.raises(TitanError, match="is not a dead letter id of 'tasks'"):
        await pm.replay_dead_letters("tasks", [bad])
    assert sync.xlen(keys.dead("tasks")) == 1
