"""``titan dashboard``, server side: a real dashboard process, real Redis, real workers.

The JSON and event endpoints, the token rule for the actions, no secret in any
response, Redis going away and coming back, and the cost of one refresh with
200 services and 2,000 workers in the registry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis as sync_redis

from titan_broker import Client
from titan_broker._registry.overview import HEARTBEAT_FIELDS, RegistryReader
from titan_broker._registry.records import WorkerInfo
from titan_broker._wire.keys import Keys
from titan_broker._wire.protocol import dead_letter_fields, encode_request
from titan_broker.testing._local_cluster import LocalCluster
from titan_broker.testing._local_redis import LocalRedis

from .conftest import CALCULATOR, SERVICES, RoutedWorkers, Workers, skip_without_cluster_binaries, wait_until

TOKEN = "dash-token-7f3a9c"


class Dashboard:
    """A ``titan dashboard`` process on a free port; ``url`` is the address it printed."""

    def __init__(self, redis_url: str, namespace: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.stderr = ""
        cmd = [sys.executable, "-m", "titan_cli", "dashboard", "--port", "0", "--redis", redis_url,
               "--namespace", namespace, "--interval", "0.5", *args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline()  # the address line, printed once listening
        if not self.banner.startswith("titan dashboard: "):
            self.close()
            raise AssertionError(f"no address printed: {self.banner!r} {self.stderr}")
        self.url = self.banner.split()[2].rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def get(self, path: str) -> Any:
        response = self.http.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def snapshot(self) -> dict[str, Any]:
        return self.get("/api/snapshot")  # type: ignore[no-any-return]

    def wait(self, predicate: Any, what: str, timeout: float = 15.0) -> dict[str, Any]:
        """The first snapshot for which ``predicate`` holds (within ``timeout`` seconds)."""

        def check() -> dict[str, Any] | None:
            snap = self.snapshot()
            return snap if predicate(snap) else None

        return wait_until(check, timeout, what)  # type: ignore[no-any-return]

    def post(self, path: str, body: Any = None, token: str | None = None) -> httpx.Response:
        headers = {"X-Titan-Token": token} if token is not None else {}
        return self.http.post(path, json=body or {}, headers=headers)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.stderr = self.proc.stderr.read()
        if hasattr(self, "http"):
            self.http.close()


def service(snap: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((s for s in snap["services"] if s["name"] == name), None)


def live_workers(snap: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [w for w in snap["workers"] if w["service"] == name and not w["gone"]]


@pytest.fixture
def dashboard(redis_url: str, namespace: str) -> Iterator[Dashboard]:
    board = Dashboard(redis_url, namespace, "--token", TOKEN)
    yield board
    board.close()


def dead_letter(client: sync_redis.Redis, keys: Keys, service: str, call_id: str, *args: Any) -> None:
    """Put a dead letter of ``service.add(*args)`` in place, as a worker that kept dying would."""
    reply_key = keys.reply(service, f"dash-{call_id}")
    fields = encode_request(call_id, "add", args, {}, reply_key, 0)
    client.xadd(keys.dead(service), dead_letter_fields(fields, reason="test", deliveries=3, worker="gone",
                                                       source_id=b"1-0"))  # type: ignore[arg-type]  # fmt: skip


def test_the_snapshot_and_the_event_stream_show_services_workers_and_calls(
    workers: Workers, dashboard: Dashboard, redis_url: str, namespace: str
) -> None:
    workers.start(CALCULATOR)
    workers.start(CALCULATOR)
    workers.wait_registered("calculator", 2)
    snap = dashboard.wait(lambda s: len(live_workers(s, "calculator")) == 2, "two calculator workers")
    calc = service(snap, "calculator")
    assert calc is not None and calc["health"]["status"] == "healthy"
    assert [v["version"] for v in calc["versions"]] == ["1.0.0"]
    add = next(m for m in calc["versions"][0]["methods"] if m["name"] == "add")
    assert add["signature"] == "add(a: float, b: float) -> float"
    assert calc["queue"] == {
        "service": "calculator",
        "backlog": 0,
        "pending": 0,
        "dead_letters": 0,
        "waiting": 0,
    }
    worker = live_workers(snap, "calculator")[0]
    assert worker["status"] == "ready" and worker["concurrency"] > 0 and worker["pid"] > 0
    assert worker["rss"] > 1_000_000 and worker["cpu"] is not None  # the worker publishes them now
    assert snap["redis"]["ok"] and snap["actions"] is True
    assert snap["cost"]["round_trips"] == 3

    async def calls() -> None:
        async with Client(redis_url, namespace=namespace) as client:
            for i in range(20):
                assert await client.call("calculator", "add", (i, 1)) == i + 1

    anyio.run(calls)
    snap = dashboard.wait(
        lambda s: sum(w["calls"] for w in live_workers(s, "calculator")) == 20, "the 20 calls counted"
    )
    history = dashboard.get("/api/history")["calculator"]
    assert sum(point[1] for point in history) > 0, "calls/s derived from the workers' counters"
    assert any(point[3] is not None for point in history), "a p50 for the refresh that saw the calls"

    # The event stream: a snapshot at once, then one per refresh.
    with dashboard.http.stream("GET", "/api/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        received: list[dict[str, Any]] = []
        for line in stream.iter_lines():
            if line.startswith("data:"):
                received.append(json.loads(line[5:]))
                if len(received) == 2:
                    break
    assert received[1]["at"] > received[0]["at"]
    assert service(received[1], "calculator") is not None

    # A killed worker: greyed out (gone), with an event saying its record expired.
    victim = workers.procs[0]
    workers.kill(victim)
    snap = dashboard.wait(
        lambda s: any(w["pid"] == victim.pid and w["gone"] for w in s["workers"]), "the killed worker gone"
    )
    assert any(e["kind"] == "gone" and str(victim.pid) in e["detail"] for e in snap["events"])
    assert any(e["kind"] == "scaled" and e["detail"] == "2 -> 1 live workers" for e in snap["events"])
    assert len(live_workers(snap, "calculator")) == 1


def test_actions_are_refused_without_the_token_and_allowed_with_it(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    dead_letter(sync_client, keys, "calculator", "d1", 2, 3)
    dead_letter(sync_client, keys, "calculator", "d2", 4, 5)
    read_only = Dashboard(redis_url, namespace)
    try:
        assert read_only.get("/api/info")["actions"] is False
        assert read_only.post("/api/auth", token=TOKEN).status_code == 403
        assert read_only.post("/api/services/calculator/dead-letters/replay", token=TOKEN).status_code == 403
        assert read_only.post("/api/services/calculator/dead-letters/purge", token=TOKEN).status_code == 403
        assert read_only.post("/api/jobs/calculator:abc/cancel", token=TOKEN).status_code == 403
        assert len(read_only.get("/api/services/calculator/dead-letters")) == 2  # reading stays open
    finally:
        read_only.close()
    assert sync_client.xlen(keys.dead("calculator")) == 2
    board = Dashboard(redis_url, namespace, env={"TITAN_DASHBOARD_TOKEN": TOKEN})
    try:
        assert board.get("/api/info")["actions"] is True
        for token in (None, "", "wrong"):
            assert board.post("/api/services/calculator/dead-letters/replay", token=token).status_code == 403
            assert board.post("/api/auth", token=token).status_code == 403
        assert board.post("/api/auth", token=TOKEN).status_code == 200
        letters = board.get("/api/services/calculator/dead-letters")
        assert {d["call_id"] for d in letters} == {"d1", "d2"}
        first = next(d for d in letters if d["call_id"] == "d1")
        replayed = board.post("/api/services/calculator/dead-letters/replay", {"ids": [first["id"]]}, TOKEN)
        assert replayed.status_code == 200 and replayed.json() == {"replayed": 1}
        # The worker serves the replayed call: the dead letter is gone and the worker counted a call.
        board.wait(lambda s: service(s, "calculator")["queue"]["dead_letters"] == 1, "one dead letter left")
        board.wait(lambda s: live_workers(s, "calculator")[0]["calls"] == 1, "the replayed call served")
        purged = board.post("/api/services/calculator/dead-letters/purge", {}, TOKEN)
        assert purged.json() == {"purged": 1} and sync_client.xlen(keys.dead("calculator")) == 0
        assert board.post("/api/services/nope/dead-letters/purge", {}, TOKEN).status_code == 404

        async def submit() -> str:
            async with Client(redis_url, namespace=namespace) as client:
                return await client.submit("calculator", "add", (1, 2), delay=300)

        job_id = anyio.run(submit)
        assert board.post(f"/api/jobs/{job_id}/cancel", token="wrong").status_code == 403
        cancelled = board.post(f"/api/jobs/{job_id}/cancel", token=TOKEN)
        assert cancelled.status_code == 200 and cancelled.json() == {"cancelled": True}
        assert board.get(f"/api/jobs/{job_id}")["state"] == "cancelled"
        assert board.http.get("/api/jobs/calculator:nosuchjob").status_code == 404
    finally:
        board.close()


def test_jobs_and_schedules_with_their_state_error_and_worker(
    workers: Workers, dashboard: Dashboard, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    dep = ("--dep", f"log={json.dumps(str(log))}")
    workers.start(SERVICES / "tasks.py", *dep)
    workers.start(SERVICES / "ticker.py", *dep)
    workers.wait_registered("tasks", 1)
    workers.wait_registered("ticker", 1)

    async def submit() -> tuple[str, str]:
        async with Client(redis_url, namespace=namespace) as client:
            done = await client.submit("tasks", "add", (2, 3))
            failed = await client.submit("tasks", "flaky", (5, "f"))  # fails its 3 attempts
            await client.job(done).result(timeout=10)
            return done, failed

    done, failed = anyio.run(submit)
    snap = dashboard.wait(
        lambda s: any(j["id"] == failed and j["state"] == "failed" for j in s["jobs"]["failed"]),
        "the failed job listed with its error",
    )
    row = next(j for j in snap["jobs"]["failed"] if j["id"] == failed)
    assert row["error"]["type"] == "ConnectionError" and "failed" in row["error"]["message"]
    assert any(j["id"] == done and j["state"] == "done" for j in snap["jobs"]["latest"])
    counts = snap["jobs"]["services"]["tasks"]
    assert counts["states"]["done"] == 1 and counts["states"]["failed"] == 1 and counts["total"] == 2
    detail = dashboard.get(f"/api/jobs/{done}")
    assert detail["state"] == "done" and detail["result"] == 5 and detail["worker"]
    ticker = lambda s: [r for r in s["jobs"]["schedules"] if r["service"] == "ticker" and r["worker"]]  # noqa: E731
    schedule = ticker(dashboard.wait(ticker, "a schedule with its last tick and where it ran"))[0]
    assert schedule["method"] == "tick" and schedule["schedule"] == "every 1 s"
    assert schedule["last"] and schedule["next"] and schedule["next"] >= schedule["last"]


def test_no_secret_reaches_any_response(workers: Workers, namespace: str) -> None:
    password = "pw-Zq81xUe"
    with LocalRedis(extra_args=["--requirepass", password]) as server:
        url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        workers.url = url
        workers.start(CALCULATOR)
        workers.wait_registered("calculator", 1)
        board = Dashboard(url, namespace, "--token", TOKEN)
        try:
            assert password not in board.banner and TOKEN not in board.banner
            board.wait(lambda s: live_workers(s, "calculator"), "the worker")
            reads = ("/", "/static/app.js", "/api/info", "/api/snapshot", "/api/history",
                     "/api/services/calculator/dead-letters", "/api/jobs/calculator:nosuch")  # fmt: skip
            bodies = [board.http.get(p).text for p in reads]
            actions = ("/api/auth", "/api/services/calculator/dead-letters/purge")
            bodies += [board.post(p, token=t).text for p in actions for t in (None, "wrong", TOKEN)]
            with board.http.stream("GET", "/api/stream") as stream:
                bodies.append(next(line for line in stream.iter_lines() if line.startswith("data:")))
            server.stop()  # an error message quoting the connection must not quote the password either
            board.wait(lambda s: not s["redis"]["ok"], "Redis reported unreachable")
            bodies += [board.http.get("/api/snapshot").text, board.http.get("/api/info").text]
            bodies.append(board.post("/api/services/calculator/dead-letters/purge", token=TOKEN).text)
            for body in bodies:
                assert password not in body and TOKEN not in body, body[:300]
            assert "***" in board.get("/api/info")["redis"]
            # On 127.0.0.1, a request naming another host (DNS rebinding) is refused.
            assert board.http.get("/api/snapshot", headers={"Host": "evil.example:80"}).status_code == 400
        finally:
            board.close()


def test_redis_going_away_is_shown_within_seconds_and_recovered_from(
    workers: Workers, namespace: str, tmp_path: Path
) -> None:
    server = LocalRedis(dir=str(tmp_path)).start()
    try:
        workers.url = server.url
        workers.start(CALCULATOR, "--heartbeat-ttl", "30")
        workers.wait_registered("calculator", 1)
        board = Dashboard(server.url, namespace)
        try:
            board.wait(lambda s: s["redis"]["ok"] and live_workers(s, "calculator"), "the worker")
            server.stop()
            started = time.monotonic()
            snap = board.wait(lambda s: not s["redis"]["ok"], "the outage shown", timeout=5)
            assert time.monotonic() - started < 5 and snap["redis"]["error"]
            server.start()  # same port; the worker registers again
            snap = board.wait(lambda s: s["redis"]["ok"] and live_workers(s, "calculator"), "recovered", 20)
            kinds = [e["kind"] for e in snap["events"]]
            assert kinds.count("redis") >= 2  # unreachable, then reachable again
        finally:
            board.close()
    finally:
        server.close()


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """Every script, style and font comes from the dashboard: no URL of another host in the page."""
    from titan_cli.dashboard.server import STATIC

    page = (STATIC / "index.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]*)"', page) and all(
        ref.startswith("/static/") for ref in re.findall(r'(?:src|href)="([^"]*)"', page)
    )
    for name in ("index.html", "app.js", "app.css", "uPlot.min.css"):
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", (STATIC / name).read_text()), name
    assert "MIT" in (STATIC / "uPlot.LICENSE").read_text()


def test_binding_beyond_loopback_without_a_token_warns(redis_url: str, namespace: str) -> None:
    board = Dashboard(redis_url, namespace, "--host", "0.0.0.0")
    board.close()
    assert "warning" in board.stderr and "without a token" in board.stderr
    quiet = Dashboard(redis_url, namespace, "--host", "0.0.0.0", "--token", TOKEN)
    quiet.close()
    assert "warning" not in quiet.stderr


def fake_registry(client: sync_redis.Redis, keys: Keys, services: int, per_service: int) -> None:
    """``services`` services of ``per_service`` live workers each, as workers would have written them."""
    methods = [{"name": f"m{i}", "signature": f"m{i}(x: int) -> int", "decorators": {}} for i in range(8)]
    pipe = client.pipeline(transaction=False)
    for s in range(services):
        name = f"svc{s:03d}"
        pipe.hset(keys.services, name, json.dumps({"name": name, "version": "1.0", "methods": methods}))
        for w in range(per_service):
            wid = f"host{w % 7}-{s}-{w}"
            info = WorkerInfo(
                worker_id=wid, service=name, version="1.0", host=f"host{w % 7}", pid=1000 + w, status="ready",
                in_flight=1, concurrency=16, calls=100 * w, errors=w, started_at=time.time(),
                heartbeat_at=time.time(), latency_counts={"20": 50, "30": 5}, methods=methods,
                cpu_percent=3.5, rss=80_000_000,
            )  # fmt: skip
            pipe.hset(keys.worker(name, wid), mapping=info.to_fields())  # type: ignore[arg-type]
            pipe.sadd(keys.workers(name), wid)
    pipe.execute()


def command_stats(client: sync_redis.Redis) -> dict[str, tuple[int, int]]:
    """Per command: (calls, microseconds) so far, as Redis counts them."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}


def test_one_refresh_costs_bounded_work_with_200_services_and_2000_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three round trips, 1 + 8 per service + 1 per worker commands, no SCAN or KEYS; measured in Redis."""
    with LocalRedis() as server:
        client = sync_redis.Redis.from_url(server.url)
        keys = Keys("cost")
        fake_registry(client, keys, 200, 10)

        async def reads(n: int) -> list[tuple[int, int, float, dict[str, tuple[int, int]]]]:
            from titan_broker._redis.connection import open_redis

            redis = await open_redis(server.url)
            reader = RegistryReader(keys)
            found = []
            try:
                for _ in range(n):
                    client.config_resetstat()
                    overview = await reader.read(redis)
                    found.append(
                        (overview.commands, overview.round_trips, overview.seconds, command_stats(client))
                    )
                    assert len(overview.services) == 200 and len(overview.workers) == 2000
            finally:
                await redis.aclose()
            return found

        results = anyio.run(reads, 6)
        client.close()
    # the services hash; per service 8 (shard count and registered users included); per worker 1
    expected = 1 + 8 * 200 + 2000
    first, steady = results[0], results[1:]
    assert first[0] == expected and first[1] == 3
    assert first[3]["hgetall"][0] == 2001  # the services hash, then each worker's whole record once
    for commands, rounds, _, stats in steady:
        assert commands == expected and rounds == 3
        assert stats["hmget"][0] == 2000 and stats["hgetall"][0] == 1  # then only the heartbeat fields
        assert not {"scan", "keys"} & set(stats)
        assert (
            sum(calls for name, (calls, _) in stats.items() if name not in ("config|resetstat", "info"))
            == expected
        )
    redis_us = sorted(
        sum(us for name, (_, us) in s[3].items() if name not in ("config|resetstat",)) for s in steady
    )
    wall_ms = sorted(s[2] * 1000 for s in steady)
    with capsys.disabled():
        print(
            f"\ndashboard refresh, 200 services / 2,000 workers: {expected} commands in 3 round trips; "
            f"Redis time (commandstats) median {redis_us[len(redis_us) // 2]} us; "
            f"wall time with parsing median {wall_ms[len(wall_ms) // 2]:.1f} ms "
            f"(first read, whole records: {first[2] * 1000:.1f} ms)"
        )
    assert len(HEARTBEAT_FIELDS) < 12


def test_the_dashboard_reads_a_cluster(namespace: str) -> None:
    """Services in different slots, read through the cluster client's pipelines, one node's URL given."""
    skip_without_cluster_binaries()
    with LocalCluster(primaries=3, replicas=0) as cluster:
        routed = RoutedWorkers(cluster.url, namespace, cluster.client)
        try:
            routed.start(CALCULATOR)
            routed.start(SERVICES / "chaos.py")
            routed.wait_registered("calculator", 1)
            routed.wait_registered("chaos", 1)
            board = Dashboard(cluster.url, namespace, "--token", TOKEN)
            try:
                snap = board.wait(
                    lambda s: live_workers(s, "calculator") and live_workers(s, "chaos"), "both services"
                )
                assert snap["redis"]["ok"] and snap["cost"]["round_trips"] == 3
                client = cluster.client()
                try:
                    dead_letter(client, Keys(namespace), "calculator", "c1", 1, 2)
                finally:
                    client.close()
                board.wait(
                    lambda s: service(s, "calculator")["queue"]["dead_letters"] == 1, "the dead letter"
                )
                assert [d["call_id"] for d in board.get("/api/services/calculator/dead-letters")] == ["c1"]
                assert board.post("/api/services/calculator/dead-letters/replay", {}, TOKEN).json() == {
                    "replayed": 1
                }
                board.wait(
                    lambda s: live_workers(s, "calculator")[0]["calls"] == 1, "the replayed call served"
                )
            finally:
                board.close()
        finally:
            routed.close()
