"""Driving a worker below the client: raw request entries in, replies, run logs and worker logs out.

The tests that check what a worker does with entries the client would never write (malformed,
huge, deleted under it), with a full Redis or with keys gone, write and read the streams here by
hand. The method of tests/services/edge_service.py notes every run in a log file, so a test counts
how often a call RAN, not how often it was answered.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from titan_broker._wire.keys import GROUP, Keys
from titan_broker._wire.protocol import F_REPLY_VALUE, Reply, decode_reply, encode_request

from .conftest import CHAOS, FAST_FAILOVER, SERVICES, Workers, run_log, wait_until

EDGE = SERVICES / "edge_service.py"
EDGE_V1 = SERVICES / "edge_v1.py"
EDGE_V2 = SERVICES / "edge_v2.py"
KIB = 1024
MIB = 1024 * 1024


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


def pending(client: sync_redis.Redis, keys: Keys, service: str) -> list[dict[str, object]]:
    """The calls of ``service`` delivered and not yet acknowledged (at most 100)."""
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
