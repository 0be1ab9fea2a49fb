"""The nemesis's faults: each one done to a real process, network link or Redis, noted with its time.

Every fault is an async function ``(env, rng) -> None`` that records a ``fault`` event
(``kind``, ``target``, ``start``, ``end``: monotonic seconds) once it has healed. Which faults a
run draws from depends on its topology (``FAULTS``) and on what the host allows (network
namespaces need root and iproute2; clock shifts need libfaketime).
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from .run import Env

HEARTBEAT_TTL = 1.0
"""The workers' heartbeat TTL (``--heartbeat-ttl``): a stall longer than this makes a worker dead."""

LIBFAKETIME = next(
    (p for p in Path("/usr/lib").glob("*/faketime/libfaketime.so.1")),
    Path("/usr/lib/faketime/libfaketime.so.1"),
)


def faketime_env(offset: Path) -> dict[str, str]:
    """A process whose wall clock is off by what the file ``offset`` says (read at every call)."""
    if not LIBFAKETIME.exists():
        return {}
    offset.write_text("+0s\n")
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


# -- a network namespace for a worker that can be cut off ------------------------------------------


# -- the faults -------------------------------------------------------------------------------------


async def kill_worker(env: Env, rng: random.Random) -> None:
    """SIGKILL a worker (as the OOM killer would); a new one takes its place."""
    worker = env.pick_worker(rng)
    if worker is None:
        return
    start = time.monotonic()
    env.kill_worker(worker)
    env.history.record("fault", kind="kill9", target=worker.wid, start=start, end=time.monotonic())
    await anyio.sleep(rng.uniform(0.2, 1.0))
    env.start_worker(netns=worker.netns)


async def stall_worker(env: Env, rng: random.Random) -> None:
    """SIGSTOP a worker for longer than its heartbeat TTL, then SIGCONT it."""
    worker = env.pick_worker(rng)
    if worker is None:
        return
    start = time.monotonic()
    worker.proc.send_signal(signal.SIGSTOP)
    try:
        await anyio.sleep(rng.uniform(1.5, 3.5) * HEARTBEAT_TTL)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    env.history.record("fault", kind="stall", target=worker.wid, start=start, end=time.monotonic())


async def shift_clock(env: Env, rng: random.Random) -> None:
    """Jump a worker's wall clock minutes ahead or behind, for a few seconds, then back."""
    worker = env.pick_worker(rng, clocked=True)
    if worker is None or worker.clock is None:
        return
    seconds = rng.choice((-1, 1)) * rng.randint(30, 600)
    start = time.monotonic()
    worker.clock.write_text(f"{seconds:+d}s\n")
    try:
        await anyio.sleep(rng.uniform(1.0, 4.0))
    finally:
        worker.clock.write_text("+0s\n")
    env.history.record("fault", kind="clock", target=worker.wid, start=start, end=time.monotonic(),
                       shift=seconds)  # fmt: skip


async def partition_worker(env: Env, rng: random.Random) -> None:
    """Cut the namespaced worker off from Redis (its link down), then heal the link."""
    if env.link is None:
        return
    start = time.monotonic()
    env.link.set(up=False)
    try:
        await anyio.sleep(rng.uniform(1.5, 4.0))
    finally:
        env.link.set(up=True)
    env.history.record("fault", kind="partition", target="netns", start=start, end=time.monotonic())


async def delete_keys(env: Env, rng: random.Random) -> None:
    """Delete a worker's registry record under it (its heartbeat must register it again)."""
    worker = env.pick_worker(rng)
    if worker is None:
        return
    start = time.monotonic()
    if not await anyio.to_thread.run_sync(env.delete_worker_keys, worker.wid):
        return
    env.history.record("fault", kind="keys_deleted", target=worker.wid, start=start, end=time.monotonic())


async def kill_caller(env: Env, rng: random.Random) -> None:
    """SIGKILL a caller process mid-call; a new caller takes its place."""
    caller = env.pick_caller(rng)
    if caller is None:
        return
    start = time.monotonic()
    env.killed.add(caller.proc.pid)
    caller.proc.kill()
    await anyio.to_thread.run_sync(caller.proc.wait)
    env.history.record("fault", kind="caller_kill", target=caller.name, start=start, end=time.monotonic())
    env.start_caller()


async def restart_redis(env: Env, rng: random.Random) -> None:
    """SIGKILL the single Redis (AOF, fsync always) and start it again on the same port."""
    server = env.single
    if server is None:
        return
    async with env.redis_lock:
        start = time.monotonic()
        server.stop(kill=True)
        try:
            await anyio.sleep(rng.uniform(0.3, 1.5))
        finally:
            await anyio.to_thread.run_sync(server.start)
        env.history.record("fault", kind="redis_restart", target="redis", start=start, end=time.monotonic())


async def kill_primary(env: Env, rng: random.Random) -> None:
    """SIGKILL the primary of the service's keys (the Cluster's node of their slot, or the one behind
    Sentinel): a replica is promoted; the old primary comes back as a replica (it lost what it had
    not replicated)."""
    if env.cluster is None and env.sentinel is None:
        return
    async with env.redis_lock:
        start = time.monotonic()
        primary = await anyio.to_thread.run_sync(env.kill_primary)
        try:
            await anyio.to_thread.run_sync(env.wait_promoted, primary)
        finally:
            await anyio.sleep(rng.uniform(0.5, 2.0))
            await anyio.to_thread.run_sync(env.heal_redis)
        env.history.record("fault", kind="failover", target=f"primary:{primary.port}", start=start,
                           end=time.monotonic())  # fmt: skip


async def stop_primary(env: Env, rng: random.Random) -> None:
    """SIGSTOP the primary of the service's keys until a replica has taken over (past a Cluster's
    node timeout; until the sentinels promote it), then SIGCONT it: it comes back to find itself a
    replica, taking writes as a primary until it does."""
    if env.cluster is None and env.sentinel is None:
        return
    async with env.redis_lock:
        start = time.monotonic()
        primary = await anyio.to_thread.run_sync(env.primary)
        assert primary.process is not None
        primary.process.send_signal(signal.SIGSTOP)
        try:
            if env.cluster is not None:
                await anyio.sleep(env.cluster.node_timeout / 1000 * rng.uniform(2.5, 4.0))
            else:
                await anyio.to_thread.run_sync(env.wait_promoted, primary)
                await anyio.sleep(rng.uniform(0.0, 1.0))
        finally:
            primary.process.send_signal(signal.SIGCONT)
        await anyio.to_thread.run_sync(env.wait_redis_whole)
        env.history.record("fault", kind="primary_stopped", target=f"primary:{primary.port}", start=start,
                           end=time.monotonic())  # fmt: skip


WORKER_FAULTS: list[tuple[Any, int]] = [
    (kill_worker, 4),
    (stall_worker, 3),
    (shift_clock, 2),
    (partition_worker, 2),
    (delete_keys, 2),
    (kill_caller, 1),
]
FAULTS: dict[str, list[tuple[Any, int]]] = {
    "single": [*WORKER_FAULTS, (restart_redis, 2)],
    "cluster": [*WORKER_FAULTS, (kill_primary, 1), (stop_primary, 1)],
    "sentinel": [*WORKER_FAULTS, (kill_primary, 1), (stop_primary, 1)],
}
"""The faults each topology draws from, with their weights."""
