"""A nemesis run: Redis (single with AOF, a Cluster with replicas, or a primary and a replica behind
three Sentinels), workers, callers, faults.

``run(RunConfig(...))`` starts everything in a folder of its own, lets the callers
(tests/nemesis/workload.py, processes of their own) run their mixed workload while the
nemesis draws faults from the seed (tests/nemesis/faults.py), heals everything, reads every
job back from this process, stops the workers with SIGTERM, and returns the checker's verdict
on the history the run wrote (tests/nemesis/checker.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import psutil
import redis as sync_redis
import redis.cluster

from titan_broker import Client, ProcessManager, TitanError
from titan_broker._wire.keys import GROUP, Keys
from titan_broker.testing._local_cluster import ClusterNode, LocalCluster
from titan_broker.testing._local_redis import LocalRedis, wait_for
from titan_broker.testing._local_sentinel import LocalSentinel

from ..netns import Link
from . import checker, faults
from .history import History

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "tests" / "services"
WORK = SERVICES / "nemesis_work.py"
POOL = SERVICES / "nemesis_pool.py"
SERVICE = "nem"
WORKER_FLAGS = ("--heartbeat-ttl", str(faults.HEARTBEAT_TTL), "--heartbeat-interval", "0.25",
                "--concurrency", "16")  # fmt: skip


@dataclass
class RunConfig:
    seconds: float
    seed: int
    topology: str
    folder: Path
    workers: int = 3
    callers: int = 3
    tasks: int = 8
    """Concurrent loops per caller process."""
    fault_pause: tuple[float, float] = (1.0, 3.0)
    """Seconds between one fault healing and the next one starting (drawn from the seed)."""
    nemeses: int = 2
    """Faults that may be under way at once (Redis-wide ones one at a time)."""
    partition: bool = True
    """Cut a namespaced worker off from Redis (single topology, when the host allows it)."""


@dataclass
class WorkerProc:
    wid: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    clock: Path | None
    netns: bool = False


@dataclass
class CallerProc:
    name: str
    proc: subprocess.Popen[bytes]


@dataclass
class Env:
    config: RunConfig
    history: History
    url: str
    namespace: str
    single: LocalRedis | None = None
    cluster: LocalCluster | None = None
    sentinel: LocalSentinel | None = None
    link: Link | None = None
    workers: list[WorkerProc] = field(default_factory=list)
    callers: list[CallerProc] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    redis_lock: anyio.Lock = field(default_factory=anyio.Lock)
    ends_at: float = 0.0
    _ids: int = 0

    @property
    def stream_key(self) -> str:
        return Keys(self.namespace).calls(SERVICE)

    def client(self) -> Any:
        if self.cluster is not None:
            return redis.cluster.RedisCluster.from_url(self.url, socket_timeout=5)
        if self.sentinel is not None:
            return self.sentinel.client()
        return sync_redis.Redis.from_url(self.url, socket_timeout=5)

    # -- workers
    def start_worker(self, *, netns: bool = False) -> WorkerProc:
        self._ids += 1
        wid = f"nem-{self._ids}" + ("-ns" if netns else "")
        folder = self.config.folder
        clock = folder / f"clock-{wid}" if faults.LIBFAKETIME.exists() and not netns else None
        env = {**os.environ, **(faults.faketime_env(clock) if clock else {})}
        url = self.url
        prefix: list[str] = []
        if netns:
            assert self.link is not None and self.single is not None
            url = f"redis://{self.link.host_ip}:{self.single.port}/0"
            prefix = ["ip", "netns", "exec", self.link.netns]
        log = (folder / f"worker-{wid}.log").open("wb")
        cmd = [*prefix, sys.executable, "-m", "titan_worker", "run", str(WORK), "--redis", url,
               "--namespace", self.namespace, "--worker-id", wid, *WORKER_FLAGS,
               "--dep", f"log={json.dumps(str(folder / 'runs.jsonl'))}"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=ROOT)
        worker = WorkerProc(wid, proc, log, clock, netns)
        self.workers.append(worker)
        self.history.record("worker_start", worker=wid, pid=proc.pid)
        return worker

    def live_workers(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.proc.poll() is None and w.proc.pid not in self.killed]

    def pick_worker(self, rng: random.Random, *, clocked: bool = False) -> WorkerProc | None:
        live = [w for w in self.live_workers() if not w.netns and (w.clock is not None or not clocked)]
        return rng.choice(sorted(live, key=lambda w: w.wid)) if len(live) > 1 else None

    def kill_worker(self, worker: WorkerProc) -> None:
        self.killed.add(worker.proc.pid)
        worker.proc.send_signal(signal.SIGCONT)
        worker.proc.kill()
        worker.proc.wait(timeout=10)
        self.history.record("worker_exit", worker=worker.wid, code=worker.proc.returncode, by="nemesis")

    def delete_worker_keys(self, wid: str) -> bool:
        """Delete a worker's record and its member of the workers set; False if Redis refused."""
        keys = Keys(self.namespace)
        try:
            client = self.client()
        except (sync_redis.RedisError, redis.exceptions.RedisClusterException):
            return False  # Redis failing over at the time: the fault did not happen
        try:
            client.delete(keys.worker(SERVICE, wid))
            client.srem(keys.workers(SERVICE), wid)
        except (sync_redis.RedisError, redis.exceptions.RedisClusterException):
            return False
        finally:
            client.close()
        return True

    # -- callers
    def start_caller(self) -> CallerProc | None:
        remaining = self.ends_at - time.monotonic()
        if remaining < 3:
            return None
        self._ids += 1
        name = f"c{self._ids}"
        folder = self.config.folder
        log = (folder / f"caller-{name}.log").open("wb")
        cmd = [sys.executable, "-m", "tests.nemesis.workload", "--url", self.url,
               "--namespace", self.namespace, "--caller", name, "--seed", str(self.config.seed),
               "--folder", str(folder),
               "--seconds", f"{remaining:.1f}", "--tasks", str(self.config.tasks)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT)
        log.close()
        caller = CallerProc(name, proc)
        self.callers.append(caller)
        self.history.record("caller_spawn", caller=name, pid=proc.pid)
        return caller

    def pick_caller(self, rng: random.Random) -> CallerProc | None:
        live = [c for c in self.callers if c.proc.poll() is None]
        return rng.choice(live) if live else None

    # -- a replicated Redis: a Cluster, or a primary and a replica behind Sentinel
    def primary(self) -> LocalRedis:
        """The primary the service's keys live on now."""
        if self.cluster is not None:
            return self.cluster.primary_for(self.stream_key)
        assert self.sentinel is not None
        return self.sentinel.primary()

    def kill_primary(self) -> LocalRedis:
        """SIGKILL the primary of the service's keys; return it."""
        if self.cluster is not None:
            primary = self.cluster.primary_for(self.stream_key)
            self.cluster.kill(primary)
            return primary
        assert self.sentinel is not None
        return self.sentinel.kill_primary()

    def wait_promoted(self, old: LocalRedis) -> None:
        if self.cluster is not None:
            assert isinstance(old, ClusterNode)
            self.cluster.wait_promoted(old, 30.0)
        else:
            assert self.sentinel is not None
            self.sentinel.wait_failover(old, 30.0)

    def heal_redis(self) -> None:
        """Restart the killed servers as replicas; wait until everything is whole again."""
        if self.cluster is not None:
            self.cluster.heal(60.0)
        elif self.sentinel is not None:
            self.sentinel.heal(60.0)

    def wait_redis_whole(self) -> None:
        if self.cluster is not None:
            wait_for(self.cluster.ready_problem, 60.0, "the cluster whole again")
        elif self.sentinel is not None:
            wait_for(self.sentinel.ready_problem, 60.0, "the sentinels' set-up whole again")

    def job_evidence(self, job_id: str) -> dict[str, Any]:
        """What Redis holds of a job that did not end: its hash, and its entry (the request it
        waits in) with who holds it, to tell a lost end from a run still owed."""
        keys = Keys(self.namespace)
        client = self.client()
        try:
            fields = {k.decode(): v.decode(errors="replace") for k, v in client.hgetall(
                keys.job(SERVICE, job_id)).items() if k != b"result"}  # fmt: skip
            entry = fields.get("entry")
            found: dict[str, Any] = {"hash": fields}
            if entry:
                found["entry_exists"] = bool(client.xrange(self.stream_key, entry, entry))
                found["pending"] = [{k: str(v) for k, v in p.items()} for p in client.xpending_range(
                    self.stream_key, GROUP, min=entry, max=entry, count=1)]  # fmt: skip
            return found
        except (sync_redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            client.close()

    # -- memory
    def memory(self) -> dict[str, Any]:
        rss = {}
        for w in self.live_workers():
            with contextlib.suppress(psutil.Error):
                rss[w.wid] = psutil.Process(w.proc.pid).memory_info().rss
        used = 0
        try:
            if self.cluster is not None:
                for node in self.cluster.primary_nodes():
                    used += int(node.info("memory").get("used_memory", 0))
            elif self.single is not None:
                client = sync_redis.Redis.from_url(self.url, socket_timeout=2)
                used = int(client.info("memory")["used_memory"])
                client.close()
            elif self.sentinel is not None:
                client = self.sentinel.client()
                used = int(client.info("memory")["used_memory"])
                client.close()
        except (sync_redis.RedisError, TitanError, OSError, ValueError):
            used = -1
        return {"rss": rss, "redis": used}


async def _nemesis(env: Env, rng: random.Random, until: float) -> None:
    menu = faults.FAULTS[env.config.topology]
    pause = env.config.fault_pause
    while time.monotonic() < until:
        await anyio.sleep(rng.uniform(*pause))
        if time.monotonic() >= until:
            return
        fault = rng.choices([f for f, _ in menu], weights=[w for _, w in menu])[0]
        try:
            await fault(env, rng)
        except Exception as exc:
            env.history.record("nemesis_error", fault=fault.__name__, error=f"{type(exc).__name__}: {exc}")


async def _watch(env: Env, until: float) -> None:
    """Note every worker, and every caller before its time is up, that exits without the nemesis's
    hand (and replace it: a caller started while Redis was down cannot connect and exits, and the
    workload must not dwindle to nothing); sample memory."""
    seen: set[int] = set()
    last_sample = 0.0
    while time.monotonic() < until:
        for w in list(env.workers):
            code = w.proc.poll()
            if code is not None and w.proc.pid not in env.killed and w.proc.pid not in seen:
                seen.add(w.proc.pid)
                w.log.flush()
                tail = (
                    (env.config.folder / f"worker-{w.wid}.log").read_bytes()[-2000:].decode(errors="replace")
                )
                env.history.record("worker_exit", worker=w.wid, code=code, by="itself", output=tail)
                env.start_worker(netns=w.netns)
        for c in list(env.callers):
            code = c.proc.poll()
            if code not in (None, 0) and c.proc.pid not in env.killed and c.proc.pid not in seen:
                seen.add(c.proc.pid)
                tail = (
                    (env.config.folder / f"caller-{c.name}.log").read_bytes()[-2000:].decode(errors="replace")
                )
                env.history.record("caller_exit", caller=c.name, code=code, output=tail)
                env.start_caller()
        if time.monotonic() - last_sample > 2:
            last_sample = time.monotonic()
            env.history.record("memory", **await anyio.to_thread.run_sync(env.memory))
        await anyio.sleep(0.2)


async def _scale_pool(pm: ProcessManager, rng: random.Random, until: float, history: History) -> None:
    pool = None
    while pool is None:
        try:
            pool = await pm.pool(POOL, size=1)
        except TitanError as exc:  # its first worker could not reach Redis (failing over): again
            history.record("pool_scale", size=1, error=f"{type(exc).__name__}: {exc}"[:300])
            if time.monotonic() >= until:
                return
            await anyio.sleep(1)
    while time.monotonic() < until:
        await anyio.sleep(rng.uniform(3, 6))
        size = rng.randint(1, 3)
        try:
            await pool.scale(size)
        except TitanError as exc:  # a worker cannot start while Redis restarts: the next scale will
            history.record("pool_scale", size=size, error=f"{type(exc).__name__}: {exc}"[:300])
        except Exception as exc:  # not a TitanError: the library let a raw error out (the checker names it)
            history.record("nemesis_error", fault="pool.scale", error=f"{type(exc).__name__}: {exc}"[:300])
        else:
            history.record("pool_scale", size=size)


async def _read_jobs(env: Env) -> None:
    """Read every job submitted back from this process (not the one that submitted it)."""
    submitted: list[str] = []
    for file in env.config.folder.glob("caller-*.jsonl"):
        for line in file.read_text().splitlines():
            if '"job_submit"' in line:
                with contextlib.suppress(json.JSONDecodeError, KeyError):
                    submitted.append(json.loads(line)["job"])
    async with Client(env.url, namespace=env.namespace) as client:
        limit = anyio.Semaphore(32)

        async def read(job_id: str) -> None:
            async with limit:
                job = client.job(job_id)
                try:
                    value = await job.result(timeout=30)
                except TitanError as exc:
                    error: str | None = type(exc).__name__
                    value = None
                    message = str(exc)[:200]
                else:
                    error, message = None, ""
                try:
                    state = str((await job.status()).state)
                except TitanError as exc:
                    state = f"error:{type(exc).__name__}"
                env.history.record("job_final", job=job_id, state=state, value=value, error=error,
                                   message=message)  # fmt: skip
                if state in ("queued", "running", "retrying"):
                    evidence = await anyio.to_thread.run_sync(env.job_evidence, job_id)
                    env.history.record("job_unended", job=job_id, **evidence)

        async with anyio.create_task_group() as tg:
            for job_id in submitted:
                tg.start_soon(read, job_id)


async def _read_ticks(env: Env, pm: ProcessManager) -> None:
    """Every run of the schedule as Redis counts it: each tick is a job whose attempts count its runs."""
    statuses = await pm.jobs(SERVICE, count=1_000_000)
    seconds, micros = await pm.client.redis.time()
    redis_ms, now = int(seconds) * 1000 + int(micros) // 1000, time.monotonic()
    for status in statuses:
        if "periodic-" not in status.id:
            continue
        tick_ms = int(status.id.split("periodic-", 1)[1].split("-", 1)[0])
        env.history.record("tick_job", job=status.id, tick_t=round(now - (redis_ms - tick_ms) / 1000, 3),
                           attempts=status.attempts, state=str(status.state))  # fmt: skip


def _heal(env: Env) -> None:
    for w in env.workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGCONT)
        if w.clock is not None:
            w.clock.write_text("+0s\n")
    if env.link is not None:
        env.link.set(up=True)
    if env.single is not None and (env.single.process is None or env.single.process.poll() is not None):
        env.single.start()
    servers: list[LocalRedis] = [*(env.cluster.nodes if env.cluster else ()),
                                 *(env.sentinel.servers if env.sentinel else ())]  # fmt: skip
    for server in servers:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
    env.heal_redis()


def _stop_workers(env: Env) -> None:
    live = env.live_workers()
    for w in live:
        w.proc.send_signal(signal.SIGTERM)
    for w in live:
        try:
            code = w.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            code = w.proc.wait(timeout=10)
            env.history.record("worker_exit", worker=w.wid, code=code, by="itself",
                               output="did not stop within 20 s of SIGTERM")  # fmt: skip
            continue
        env.history.record("worker_exit", worker=w.wid, code=code, by="sigterm" if code == 0 else "itself",
                           output="" if code == 0 else (env.config.folder / f"worker-{w.wid}.log")
                           .read_bytes()[-2000:].decode(errors="replace"))  # fmt: skip


async def _main(env: Env) -> None:
    config = env.config
    started = time.monotonic()
    env.ends_at = started + config.seconds
    env.history.record("phase", name="start", seed=config.seed, topology=config.topology,
                       seconds=config.seconds, wall=time.time())  # fmt: skip
    async with ProcessManager(env.url, namespace=env.namespace) as pm:
        for _ in range(config.workers):
            env.start_worker()
        if env.link is not None:
            env.start_worker(netns=True)
        await anyio.to_thread.run_sync(_wait_registered, env, config.workers + (env.link is not None))
        for _ in range(config.callers):
            env.start_caller()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch, env, env.ends_at + 5)
            tg.start_soon(_scale_pool, pm, random.Random(config.seed + 1), env.ends_at, env.history)
            for i in range(config.nemeses):
                tg.start_soon(_nemesis, env, random.Random(f"{config.seed}:{i}"), env.ends_at)
            # Every caller ends by itself when its time is up (a caller still running 60 s later hung).
            with anyio.move_on_after(config.seconds + 60):
                while any(c.proc.poll() is None for c in env.callers) or time.monotonic() < env.ends_at:  # noqa: ASYNC110 - processes: no event to wait on
                    await anyio.sleep(0.2)
            hung = [c.name for c in env.callers if c.proc.poll() is None]
            for c in env.callers:
                if c.proc.poll() is None:
                    c.proc.kill()
                    c.proc.wait()
            if hung:
                env.history.record("caller_hung", callers=hung)
            await anyio.to_thread.run_sync(_heal, env)
            env.history.record("phase", name="healed")
            await _read_jobs(env)
            await anyio.sleep(4)  # the schedule must tick again after the faults: the checker looks
            await _read_ticks(env, pm)
            env.history.record("phase", name="jobs_read")
            tg.cancel_scope.cancel()
        env.history.record("memory", **await anyio.to_thread.run_sync(env.memory))
        await anyio.to_thread.run_sync(_stop_workers, env)
    env.history.record("phase", name="end")


def _wait_registered(env: Env, count: int) -> None:
    keys = Keys(env.namespace)
    client = env.client()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ids = client.smembers(keys.workers(SERVICE))
            if sum(1 for i in ids if client.exists(keys.worker(SERVICE, i.decode()))) >= count:
                return
            time.sleep(0.1)
        raise TitanError(f"{count} nemesis workers not registered within 60 s")
    finally:
        client.close()


def run(config: RunConfig) -> checker.Verdict:
    """Run the nemesis as ``config`` says; the checker's verdict on the history it wrote."""
    config.folder.mkdir(parents=True, exist_ok=True)
    history = History(config.folder / "nemesis.jsonl")
    namespace = f"nem{config.seed}"
    link = Link.make() if config.partition and config.topology == "single" else None
    single: LocalRedis | None = None
    cluster: LocalCluster | None = None
    sentinel: LocalSentinel | None = None
    try:
        if config.topology == "single":
            bind = ["--bind", "127.0.0.1", link.host_ip, "--protected-mode", "no"] if link else []
            single = LocalRedis(extra_args=["--appendonly", "yes", "--appendfsync", "always", *bind]).start()
            url = single.url
        elif config.topology == "cluster":
            cluster = LocalCluster(primaries=3, replicas=1).start()
            url = cluster.url
        elif config.topology == "sentinel":
            sentinel = LocalSentinel(sentinels=3).start()
            url = sentinel.url
        else:
            raise TitanError(f"no topology {config.topology!r}: single, cluster or sentinel")
        env = Env(config, history, url, namespace, single=single, cluster=cluster, sentinel=sentinel,
                  link=link)  # fmt: skip
        try:
            anyio.run(_main, env)
        finally:
            for w in env.workers:
                if w.proc.poll() is None:
                    w.proc.send_signal(signal.SIGCONT)
                    w.proc.kill()
                    w.proc.wait()
                w.log.close()
            for c in env.callers:
                if c.proc.poll() is None:
                    c.proc.kill()
                    c.proc.wait()
    finally:
        history.close()
        if single is not None:
            single.close()
        if cluster is not None:
            cluster.close()
        if sentinel is not None:
            sentinel.close()
        if link is not None:
            link.remove()
    verdict = checker.check(checker.load(config.folder))
    (config.folder / "verdict.json").write_text(json.dumps(verdict.to_dict(), indent=2))
    return verdict
