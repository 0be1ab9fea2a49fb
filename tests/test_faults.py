"""Nothing lost, nothing hung: failover after SIGKILL, poison calls, backlog, outages, bad input."""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest
import redis as sync_redis

from titan_broker import (
    BacklogFull,
    BadArguments,
    Client,
    DeadLettered,
    PayloadTooLarge,
    ProcessManager,
    RedisUnavailable,
)
from titan_broker._wire.keys import GROUP, Keys
from titan_broker._wire.protocol import encode_request
from titan_broker.testing._local_redis import LocalRedis

from .conftest import CALCULATOR, CHAOS, FAST_FAILOVER, SERVICES, Workers, in_thread, titan, wait_until

pytestmark = pytest.mark.anyio


def pending(client: sync_redis.Redis, keys: Keys, service: str) -> list[dict[str, object]]:
    return list(client.xpending_range(keys.calls(service), GROUP, "-", "+", 100))


def two_chaos_workers(workers: Workers, *args: str) -> dict[str, subprocess.Popen[bytes]]:
    """Workers "a" and "b" of the chaos service, both registered before any call is sent.

    (A worker started after the call would have to start before the call ends: not on a busy machine.)
    """
    procs = {wid: workers.start(CHAOS, *FAST_FAILOVER, "--worker-id", wid, *args) for wid in ("a", "b")}
    workers.wait_registered("chaos", 2)
    return procs


def holder(client: sync_redis.Redis, keys: Keys) -> str | None:
    """The id of the worker holding the chaos service's one call in flight, if any."""
    entries = pending(client, keys, "chaos")
    return entries[0]["consumer"].decode() if entries else None  # type: ignore[attr-defined]


async def test_call_survives_worker_kill(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    procs = two_chaos_workers(workers)
    async with Client(redis_url, namespace=namespace) as client:
        async with anyio.create_task_group() as tg:
            result: list[object] = []

            async def call() -> None:
                result.append(await client.call("chaos", "work", (21, 1500), timeout=20))

            tg.start_soon(call)
            first = procs.pop(
                str(await in_thread(wait_until, lambda: holder(sync_client, keys), 10, "delivery"))
            )
            [second] = procs.values()
            killed_at = time.monotonic()
            workers.kill(first)
        failover = time.monotonic() - killed_at
    assert result == [[42, second.pid]]
    # Claimed once the dead worker's heartbeat expired (1 s), not after an hour; the call takes 1.5 s.
    assert failover < 1.5 + 4.0, failover
    assert pending(sync_client, keys, "chaos") == []


async def test_live_worker_on_long_call_is_never_robbed(
    workers: Workers,
    redis_url: str,
    namespace: str,
    keys: Keys,
    sync_client: sync_redis.Redis,
    tmp_path: Path,
) -> None:
    log = tmp_path / "runs.log"
    procs = two_chaos_workers(workers, "--dep", f"log={json.dumps(str(log))}")
    async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
        result: list[object] = []

        async def call() -> None:
            result.append(await client.call("chaos", "work", (1, 4000), timeout=20))

        tg.start_soon(call)
        owner = procs[str(await in_thread(wait_until, lambda: holder(sync_client, keys), 10, "delivery"))]
        await anyio.sleep(2.5)  # more than twice the heartbeat TTL, while the other worker looks for work
        [entry] = pending(sync_client, keys, "chaos")
        assert entry["times_delivered"] == 1
        assert entry["time_since_delivered"] < 1000  # renewed by its live owner
    assert result == [[2, owner.pid]]
    assert log.read_text().splitlines() == [f"1 {owner.pid} 0"]  # it ran once


async def test_poison_call_is_dead_lettered_and_its_caller_told(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    procs = [workers.start(CHAOS, *FAST_FAILOVER) for _ in range(3)]
    workers.wait_registered("chaos", 3)
    async with Client(redis_url, namespace=namespace) as client:
        started = time.monotonic()
        with pytest.raises(DeadLettered, match=r"delivered 3 times \(max_deliveries 2\)"):
            await client.call("chaos", "crash", timeout=30)
        assert time.monotonic() - started < 15
        assert sum(p.poll() is not None for p in procs) == 2  # two deliveries, two dead workers
        for p in procs:
            if p.poll() is not None:
                workers.killed.add(p.pid)
        assert await client.call("chaos", "work", (5,)) == [
            10,
            next(p.pid for p in procs if p.poll() is None),
        ]
    letters = sync_client.xrange(keys.dead("chaos"))
    assert len(letters) == 1
    assert letters[0][1][b"m"] == b"crash"
    assert sync_client.xlen(keys.calls("chaos")) == 0


async def test_dead_letters_list_replay_and_purge(
    workers: Workers, pm: ProcessManager, keys: Keys, tmp_path: Path
) -> None:
    marker = tmp_path / "allowed"
    for _ in range(3):
        workers.start(CHAOS, *FAST_FAILOVER)
    workers.wait_registered("chaos", 3)
    with pytest.raises(DeadLettered):
        await pm.client.call("chaos", "crash_unless", (str(marker),), timeout=30)
    [letter] = await pm.dead_letters("chaos")
    assert letter.method == "crash_unless"
    assert letter.deliveries == 3
    assert letter.arguments == [[str(marker)], {}]
    assert "dead letters of 'chaos'" in letter.reason
    assert letter.reason.startswith("crash_unless() was delivered 3 times (max_deliveries 2)")
    marker.write_text("")
    assert await pm.replay_dead_letters("chaos") == 1
    await in_thread(wait_until, lambda: marker.read_text() == "ran\n", 15, "the replayed call to run")
    assert await pm.dead_letters("chaos") == []
    # Purge: dead-letter an unanswerable entry (no reply key), then remove it.
    await pm.client.redis.xadd(keys.calls("chaos"), {b"junk": b"\xff"})
    letters = await anyio.to_thread.run_sync(
        lambda: wait_until(lambda: anyio.from_thread.run(pm.dead_letters, "chaos"), 10, "a dead letter")
    )
    assert "unanswerable request" in letters[0].reason
    assert await pm.purge_dead_letters("chaos") == 1
    assert await pm.dead_letters("chaos") == []


async def test_cli_dead_letters(workers: Workers, redis_url: str, namespace: str, keys: Keys) -> None:
    workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    redis = sync_redis.Redis.from_url(redis_url)
    redis.xadd(keys.calls("calculator"), {b"junk": b"1"})
    redis.close()

    def listing() -> list[dict[str, object]]:
        return json.loads(titan(redis_url, namespace, "dead-letters", "calculator", "--json").stdout)  # type: ignore[no-any-return]

    listed = await in_thread(wait_until, listing, 10, "a dead letter")
    assert len(listed) == 1 and "unanswerable" in listed[0]["reason"]
    table = titan(redis_url, namespace, "dead-letters", "calculator")
    assert "unanswerable" in table.stdout
    replayed = titan(redis_url, namespace, "dead-letters", "calculator", "--replay", "--json")
    assert json.loads(replayed.stdout) == {"replayed": 1}
    # Junk stays junk: the worker dead-letters it again, with a new id.
    again = await in_thread(
        wait_until, lambda: [d for d in listing() if d["id"] != listed[0]["id"]], 10, "the replayed junk"
    )
    assert len(again) == 1 and len(listing()) == 1
    purged = titan(redis_url, namespace, "dead-letters", "calculator", "--purge", "--yes", "--json")
    assert json.loads(purged.stdout) == {"purged": 1}
    assert listing() == []


async def test_dead_consumer_is_removed_once_its_calls_are_claimed(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    procs = two_chaos_workers(workers)
    async with Client(redis_url, namespace=namespace) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.call, "chaos", "work", (1, 3000))  # still running when its worker dies
        dead_id = str(await in_thread(wait_until, lambda: holder(sync_client, keys), 10, "delivery"))
        [second_id] = set(procs) - {dead_id}
        workers.kill(procs[dead_id])

    def consumers() -> set[str]:
        return {c["name"].decode() for c in sync_client.xinfo_consumers(keys.calls("chaos"), GROUP)}

    await in_thread(wait_until, lambda: dead_id not in consumers(), 15, "the dead consumer to go")
    assert consumers() == {second_id}  # the live worker's consumer stays


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


async def test_wrong_argument_types_are_refused_before_the_method_runs(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR)
    with pytest.raises(BadArguments, match=r"argument 'a' must be float, got str \('five'\)"):
        await calc.add("five", 3)
    with pytest.raises(BadArguments, match="argument 'n' must be int, got float"):
        await calc.factorial(2.5)
    assert (await calc.get_stats())["operation_count"] == 0
    assert await calc.add(1, 2.5) == 3.5


async def test_payload_size_limit_is_checked_by_sender_and_receiver(
    workers: Workers, redis_url: str, namespace: str, keys: Keys
) -> None:
    workers.start(SERVICES / "slow.py", "--max-payload", "1000")
    workers.wait_registered("slow", 1)
    async with Client(redis_url, namespace=namespace, max_payload=500) as client:
        with pytest.raises(PayloadTooLarge, match="over the limit of 500"):
            await client.call("slow", "echo", ("x" * 600,))
    async with Client(redis_url, namespace=namespace) as client:
        with pytest.raises(PayloadTooLarge, match="over the limit of 1000"):
            await client.call("slow", "echo", ("x" * 2000,))
        assert await client.call("slow", "echo", ("x" * 100,)) == "x" * 100


async def test_duplicate_and_garbage_replies_are_ignored(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR)
    assert await calc.add(1, 1) == 2
    client = pm.client
    reply_key = client.keys.reply("calculator", client.client_id)
    from titan_broker._wire.protocol import encode_ok

    await client.redis.xadd(reply_key, {b"reply": encode_ok(f"{client.client_id}-1", 999, "forged")})
    await client.redis.xadd(reply_key, {b"reply": b"\x00garbage"})
    assert await calc.add(2, 2) == 4


async def test_calls_fail_fast_while_redis_is_down_and_work_again_after(
    workers: Workers, aof_redis: LocalRedis, namespace: str
) -> None:
    workers.url = aof_redis.url
    workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    async with Client(aof_redis.url, namespace=namespace) as client:
        assert await client.call("calculator", "add", (1, 1)) == 2
        aof_redis.stop(kill=True)
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="Redis is unreachable"):
            await client.call("calculator", "add", (2, 2), timeout=5)
        assert time.monotonic() - started < 2
        aof_redis.start()
        result = None
        with anyio.fail_after(20):
            while result is None:
                try:
                    result = await client.call("calculator", "add", (3, 3), timeout=5)
                except RedisUnavailable:
                    await anyio.sleep(0.1)  # the client reconnects on its next command
        assert result == 6


async def test_calls_in_flight_complete_across_a_redis_restart(
    workers: Workers, aof_redis: LocalRedis, namespace: str, keys: Keys
) -> None:
    workers.url = aof_redis.url
    for _ in range(2):
        workers.start(CHAOS, "--heartbeat-ttl", "3")
    workers.wait_registered("chaos", 2)
    async with Client(aof_redis.url, namespace=namespace) as client:
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = (await client.call("chaos", "work", (i, 1500), timeout=30))[0]

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
            admin = sync_redis.Redis.from_url(aof_redis.url)

            def running() -> bool:
                return bool(admin.xpending(keys.calls("chaos"), GROUP)["pending"] == 20)

            await in_thread(wait_until, running, 10, "all twenty calls running")
            admin.close()
            aof_redis.stop(kill=True)
            await anyio.sleep(1.0)  # the outage
            aof_redis.start()
    assert results == {i: i * 2 for i in range(20)}


UNPICKLERS = frozenset(
    {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}
)
"""Modules that turn bytes into arbitrary objects (or code)."""
LIBRARY = ("titan_broker", "worker/titan_worker", "cli/titan_cli")


def unsafe_loading(source: str) -> list[str]:
    """What in ``source`` could unpickle, or import or run code named by data.

    Flags any import of an unpickler (``import dill``, ``from pickle import loads``,
    ``import cloudpickle as cp``, submodules too), and ``__import__``,
    ``importlib.import_module``, ``eval`` and ``exec`` called on anything but a
    string literal (or on a literal naming an unpickler).
    """
    found: list[str] = []
    tree = ast.parse(source)
    importers = {"__import__", "import_module"}  # names bound to a dynamic importer
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNPICKLERS:
                found.append(f"from {node.module} import ...")
            if node.module == "importlib":
                importers |= {a.asname or a.name for a in node.names if a.name == "import_module"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name not in importers | {"eval", "exec"}:
            continue
        first = node.args[0] if node.args else None
        literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
        if not literal or (name != "eval" and str(first.value).split(".")[0] in UNPICKLERS):  # type: ignore[union-attr]
            found.append(f"{name}(...) at line {node.lineno}")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import pickle", "import _pickle", "from pickle import loads", "import cloudpickle as cp",
        "from dill.detect import trace", "import marshal", "import shelve", "import jsonpickle",
        "def f(x):\n    import dill\n    return dill.loads(x)", "mod = __import__(name)",
        "import importlib\nimportlib.import_module(data['m'])", "__import__('pickle')",
        "from importlib import import_module as im\nim(name)", "eval(text)",
        "exec(compile(src, 'f', 'exec'))",
    ],
)  # fmt: skip
def test_the_unpickler_check_catches(source: str) -> None:
    assert unsafe_loading(source), source


def test_the_unpickler_check_passes_plain_code() -> None:
    source = "import json\nimport msgpack\nimport importlib.util\nfrom importlib import resources\n"
    assert unsafe_loading(source + "value = json.loads(data)\nimportlib.import_module('json')\n") == []


def test_no_module_can_unpickle_or_import_by_data() -> None:
    root = Path(__file__).resolve().parent.parent
    checked = 0
    for folder in LIBRARY:
        for path in sorted((root / folder).rglob("*.py")):
            assert unsafe_loading(path.read_text()) == [], path
            checked += 1
    assert checked >= 20  # the folders were found


def test_worker_exit_code_2_for_bad_options(workers: Workers) -> None:
    proc = workers.start(CALCULATOR, "--concurrency", "0")
    assert proc.wait(timeout=20) == 2
    assert b"concurrency must be at least 1" in workers.output(proc)


def test_second_sigterm_stops_without_waiting_for_the_grace_period(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    proc = workers.start(SERVICES / "slow.py", "--grace", "60")
    workers.wait_registered("slow", 1)

    sync_client.xadd(
        keys.calls("slow"), encode_request("c", "sleep", (30,), {}, keys.reply("slow", "x"), 60_000)
    )  # type: ignore[arg-type]
    wait_until(lambda: pending(sync_client, keys, "slow"), 10, "the worker to take the call")
    started = time.monotonic()
    [wid] = workers.wait_registered("slow", 1)
    proc.send_signal(signal.SIGTERM)
    # Two signals sent back to back may merge into one: send the second once the first shows.
    wait_until(lambda: sync_client.hget(keys.worker("slow", wid), "status") == b"draining", 10, "draining")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
