"""A partition on real network namespaces: a worker cut off from Redis never replies for calls it lost.

One worker runs as a host of its own: in a network namespace, reaching a
private Redis over a veth pair. A second worker runs in the root namespace.
The test cuts the link while the namespaced worker holds calls, lets the
other worker take them over, restores the link and reads the caller's reply
stream directly: every call answered exactly once, none of the lost calls by
the worker that lost them, nothing left pending, and the cut-off worker back
in service.

Needs root and iproute2 (skipped otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as sync_redis

from titan_broker._wire.keys import GROUP, Keys
from titan_broker._wire.protocol import F_REPLY_VALUE, decode_reply, encode_request
from titan_broker.testing._local_redis import LocalRedis

from .conftest import FAST_FAILOVER, SERVICES, Workers, wait_until
from .netns import Link

pytestmark = pytest.mark.slow

SERVICE = "partition"
SERVICE_FILE = SERVICES / "partition_svc.py"
# Capacities: with 12 calls in flight the namespaced worker holds exactly 4.
CUT_SLOTS, ROOT_SLOTS = 4, 8
# The link stays down at least this long: four heartbeat TTLs, so the cut-off worker's connections
# stall (and a worker with socket timeouts would see them fail) rather than blink.
CUT_AT_LEAST = 4.0


@pytest.fixture
def link() -> Iterator[Link]:
    made = Link.make("titan-part")
    if made is None:
        pytest.skip("network namespaces unavailable (they need root, iproute2 and veth pairs)")
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def server(link: Link) -> Iterator[LocalRedis]:
    """A private Redis listening on loopback and on the root end of the veth pair."""
    args = ["--bind", "127.0.0.1", link.host_ip, "--protected-mode", "no"]
    with LocalRedis(extra_args=args) as redis_server:
        yield redis_server


class NetnsWorkers(Workers):
    """Workers, some of them started inside a network namespace (ended by pid like the others)."""

    def start_in(self, netns: str, url: str, path: str | Path, *args: str) -> subprocess.Popen[bytes]:
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "titan_worker", "run", str(path),
               "--redis", url, "--namespace", self.namespace, *args]  # fmt: skip
        log = tempfile.TemporaryFile()  # noqa: SIM115 - open while the worker runs
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)  # `ip netns exec` execs: same pid
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc


@pytest.fixture
def partition_workers(server: LocalRedis, namespace: str) -> Iterator[NetnsWorkers]:
    w = NetnsWorkers(server.url, namespace)
    yield w
    for proc in w.procs:  # shown by pytest when the test failed
        print(f"--- worker {proc.pid} ({' '.join(proc.args[:4])} ...):")
        print(w.output(proc).decode(errors="replace")[-6000:])
    w.close()


@pytest.fixture
def redis(server: LocalRedis) -> Iterator[sync_redis.Redis]:
    client = sync_redis.Redis.from_url(server.url)
    yield client
    client.close()


def test_worker_cut_off_from_redis_never_replies_for_calls_taken_over(
    link: Link,
    server: LocalRedis,
    redis: sync_redis.Redis,
    partition_workers: NetnsWorkers,
    namespace: str,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    keys = Keys(namespace)
    stream = keys.calls(SERVICE)
    tag = uuid.uuid4().hex[:6]
    cut_id, root_id = f"cut-{tag}", f"root-{tag}"
    gates = tmp_path / "gates"
    gates.mkdir()
    run_log = tmp_path / "runs.log"
    run_log.touch()
    deps = ("--dep", f"gates={json.dumps(str(gates))}", "--dep", f"log={json.dumps(str(run_log))}", "-v")
    reply_key = keys.reply(SERVICE, f"partition-{tag}")
    entry_of: dict[int, bytes] = {}

    def send(calls: range) -> None:
        for i in calls:
            fields = encode_request(f"call-{i}", "hold", (i,), {}, reply_key, 120_000)  # timeout, ms
            entry_of[i] = redis.xadd(stream, fields)  # type: ignore[arg-type]

    def holders() -> dict[int, tuple[str, int]]:
        """Call -> (consumer holding it, times delivered), for the calls pending now."""
        call_of = {entry: i for i, entry in entry_of.items()}
        return {
            call_of[p["message_id"]]: (p["consumer"].decode(), p["times_delivered"])
            for p in redis.xpending_range(stream, GROUP, "-", "+", 100)
        }

    def held_by(worker_id: str) -> list[int]:
        return sorted(i for i, (consumer, _) in holders().items() if consumer == worker_id)

    def answers() -> dict[str, list[tuple[str | None, object]]]:
        """Call id -> (worker id, value) of every reply on the caller's reply stream, in order."""
        found: dict[str, list[tuple[str | None, object]]] = defaultdict(list)
        for _, fields in redis.xrange(reply_key):
            reply = decode_reply(fields[F_REPLY_VALUE])
            assert reply is not None, f"undecodable reply {fields!r}"
            found[reply.call_id].append((reply.worker_id, reply.value if reply.ok else reply.error))
        return found

    def runs(event: str, pid: int) -> set[int]:
        """The calls that noted ``event`` ("start" or "stop") in worker ``pid``."""
        lines = [line.split() for line in run_log.read_text().splitlines()]
        return {int(i) for e, i, p in lines if e == event and int(p) == pid}

    def open_gates(calls: list[int] | range) -> None:
        for i in calls:
            (gates / str(i)).touch()

    def record(worker_id: str) -> dict[bytes, bytes]:
        return redis.hgetall(keys.worker(SERVICE, worker_id))  # type: ignore[return-value]

    # Two hosts: a worker in the root namespace, and one in the namespace reaching Redis over the veth.
    root = partition_workers.start(
        SERVICE_FILE, *FAST_FAILOVER, "--concurrency", str(ROOT_SLOTS), "--worker-id", root_id, *deps
    )
    cut = partition_workers.start_in(
        link.netns, f"redis://{link.host_ip}:{server.port}/0", SERVICE_FILE,
        *FAST_FAILOVER, "--concurrency", str(CUT_SLOTS), "--worker-id", cut_id, *deps,
    )  # fmt: skip
    assert set(partition_workers.wait_registered(SERVICE, 2)) == {root_id, cut_id}
    assert int(record(cut_id)[b"pid"]) == cut.pid and int(record(root_id)[b"pid"]) == root.pid

    # 12 calls for 12 slots: every slot busy, so the namespaced worker holds exactly 4, all running.
    send(range(12))
    wait_until(
        lambda: len(held_by(cut_id)) == CUT_SLOTS and len(held_by(root_id)) == ROOT_SLOTS,
        15, "both workers to fill their slots",
    )  # fmt: skip
    lost, kept = held_by(cut_id), held_by(root_id)
    wait_until(lambda: runs("start", cut.pid) == set(lost), 10, "the namespaced worker to run its calls")

    # Cut the link. Redis sees the namespaced worker die (its record expires) ...
    link.set(up=False)
    cut_at = time.monotonic()
    wait_until(
        lambda: not redis.exists(keys.worker(SERVICE, cut_id)), 10, "the cut-off worker's record to expire"
    )
    # ... the other worker goes on serving, and takes the lost calls over once it has free slots.
    open_gates(kept)
    wait_until(lambda: all(answers().get(f"call-{i}") for i in kept), 15, "the root worker's own calls")

    def taken_over() -> bool:
        claimed = all(holders().get(i, ("", 0))[0] == root_id for i in lost)
        return claimed and runs("start", root.pid) >= set(lost)

    wait_until(taken_over, 15, "the root worker to take over the lost calls")
    # Half of the lost calls end while the link is down: the cut-off worker has finished them
    # (a result in hand) and the root worker answers them.
    ended_in_cut, ended_after = lost[:2], lost[2:]
    open_gates(ended_in_cut)
    wait_until(
        lambda: runs("stop", cut.pid) >= set(ended_in_cut)
        and all(answers().get(f"call-{i}") for i in ended_in_cut),
        15, "the calls that end during the cut",
    )  # fmt: skip
    time.sleep(max(0.0, CUT_AT_LEAST - (time.monotonic() - cut_at)))  # the length of the cut is the point
    assert not redis.exists(keys.worker(SERVICE, cut_id)), "the cut-off worker reached Redis during the cut"
    link.set(up=True)
    cut_for = time.monotonic() - cut_at

    # The link is back: the cut-off worker registers again. The other half of the lost calls,
    # still running in both workers, end now.
    wait_until(lambda: redis.exists(keys.worker(SERVICE, cut_id)), 30, "the cut-off worker to register again")
    open_gates(ended_after)
    wait_until(
        lambda: runs("stop", cut.pid) >= set(lost) and runs("stop", root.pid) >= set(lost),
        15, "the lost calls to end in both workers",
    )  # fmt: skip
    # Its calls settled one way or another (a reply, or dropped): nothing more will come from them.
    wait_until(lambda: record(cut_id).get(b"in_flight") == b"0", 30, "the cut-off worker to settle its calls")

    # It serves new calls: 12 calls for 12 slots again, so it holds 4 and answers them.
    send(range(12, 24))
    wait_until(
        lambda: len(held_by(cut_id)) == CUT_SLOTS and len(held_by(root_id)) == ROOT_SLOTS,
        30, "both workers to fill their slots after the cut",
    )  # fmt: skip
    new_on_cut = held_by(cut_id)
    open_gates(range(12, 24))
    wait_until(lambda: len(answers()) == 24, 15, "answers to the new calls")
    wait_until(lambda: redis.xlen(stream) == 0 and not holders(), 10, "the stream to empty")

    got = answers()
    pid_of = {root_id: root.pid, cut_id: cut.pid}
    worker_of = {cid: [w for w, _ in replies] for cid, replies in got.items()}
    from_cut_off = {f"call-{i}": worker_of[f"call-{i}"] for i in lost if cut_id in worker_of[f"call-{i}"]}
    assert from_cut_off == {}, (
        f"the cut-off worker {cut_id} replied for calls taken over while it was away "
        f"(workers that answered each call, in order): {from_cut_off}"
    )
    assert {cid: ws for cid, ws in worker_of.items() if len(ws) != 1} == {}, "calls answered more than once"
    assert sorted(got) == sorted(f"call-{i}" for i in range(24))
    expected = {
        **{i: root_id for i in [*kept, *lost]},
        **{i: root_id for i in range(12, 24)},
        **{i: cut_id for i in new_on_cut},
    }
    # Each answer is the value its worker computed: [i, that worker's pid].
    assert got == {f"call-{i}": [(w, [i, pid_of[w]])] for i, w in expected.items()}
    # Taken over: each lost call ran in both workers (at least once), every other call ran once.
    assert runs("start", cut.pid) == {*lost, *new_on_cut}
    assert runs("start", root.pid) == {*kept, *lost, *(set(range(12, 24)) - set(new_on_cut))}
    # Nothing corrupted: nothing pending, nothing left in the stream, nothing dead-lettered.
    assert redis.xlen(stream) == 0
    assert redis.xpending(stream, GROUP)["pending"] == 0
    assert redis.xlen(keys.dead(SERVICE)) == 0
    assert cut.poll() is None and root.poll() is None
    print(f"link down {cut_for:.1f} s; test body {time.monotonic() - started:.1f} s")
