"""The registry: the worker record's one definition, every version serving, and `titan call` to no service."""

from __future__ import annotations

import json
import signal
import time

import pytest
import redis as sync_redis

from titan_broker import ProcessManager
from titan_broker._registry.records import (
    VersionInfo,
    WorkerInfo,
    list_services,
    remove_worker,
    serving_versions,
)
from titan_broker._wire.keys import Keys

from .conftest import SERVICES, Workers, titan

V1 = SERVICES / "registry_v1.py"
V2 = SERVICES / "registry_v2.py"

pytestmark = pytest.mark.anyio


def record(
    worker_id: str = "w1", version: str = "1.0.0", started_at: float = 100.0, **kw: object
) -> WorkerInfo:
    fields: dict[str, object] = {
        "worker_id": worker_id, "service": "svc", "version": version, "host": "h", "pid": 42,
        "status": "ready", "in_flight": 1, "concurrency": 16, "calls": 7, "errors": 1,
        "started_at": started_at, "heartbeat_at": 123.456, **kw,
    }  # fmt: skip
    return WorkerInfo(**fields)  # type: ignore[arg-type]  # the test's loose keywords


# -- the record ------------------------------------------------------------------------------


def test_a_record_survives_its_fields_both_ways() -> None:
    full = record(
        health={"status": "healthy", "checks": {}, "details": {}, "at": 1.5},
        unhealthy_streak=2,
        latency_counts={"3": 4},
        methods=[{"name": "hello", "signature": "hello() -> str"}],
        metrics_port=9100,
        metrics={"hello": {"calls": 3}},
    )
    fields = full.to_fields()
    assert fields["pid"] == "42" and fields["heartbeat_at"] == "123.456" and fields["latency"] == '{"3": 4}'
    as_redis = {k.encode(): v.encode() for k, v in fields.items()}  # HGETALL hands back bytes
    assert WorkerInfo.from_fields(as_redis) == full
    assert WorkerInfo.from_fields(fields) == full
    assert WorkerInfo is WorkerInfo and WorkerInfo.from_record(as_redis) == full


def test_a_heartbeat_writes_only_what_changes() -> None:
    beat = record(metrics_port=9100).to_fields(heartbeat_only=True)
    assert set(beat) == {
        "status", "in_flight", "calls", "errors", "heartbeat_at", "latency", "unhealthy_streak", "metrics",
    }  # fmt: skip
    assert "health" in record(health={"status": "degraded"}).to_fields(heartbeat_only=True)


def test_missing_fields_read_as_placeholders() -> None:
    parsed = WorkerInfo.from_fields({b"worker_id": b"w9"})
    assert (parsed.worker_id, parsed.version, parsed.pid, parsed.health, parsed.metrics_port) == (
        "w9", "?", 0, None, None,
    )  # fmt: skip
    assert parsed.methods == [] and "methods" not in parsed.to_dict()


def test_the_worker_writes_exactly_the_shared_record(
    redis_url: str, namespace: str, workers: Workers, sync_client: sync_redis.Redis
) -> None:
    workers.start(V2)
    [wid] = workers.wait_registered("versioned", 1)
    raw = sync_client.hgetall(Keys(namespace).worker("versioned", wid))
    parsed = WorkerInfo.from_fields(raw)
    assert (parsed.worker_id, parsed.version) == (wid, "2.0.0")
    assert parsed.method_names == {"hello", "added"}
    # Same field names, same encodings: serializing what was read gives back what the worker wrote.
    assert parsed.to_fields() == {k.decode(): v.decode() for k, v in raw.items()}


async def test_remove_worker_takes_it_out_of_discovery_at_once(pm: ProcessManager, workers: Workers) -> None:
    workers.start(V1)
    [wid] = workers.wait_registered("versioned", 1)
    redis, keys = pm.client.redis, pm.client.keys
    await remove_worker(redis, keys, "versioned", wid)
    assert not await redis.exists(keys.worker("versioned", wid))
    assert not await redis.sismember(keys.workers("versioned"), wid)


# -- versions serving ------------------------------------------------------------------------


def test_versions_are_grouped_in_version_order() -> None:
    old = record("a", "1.9.2", methods=[{"name": "x"}])
    new_1 = record("b", "1.10.0", started_at=1.0, methods=[{"name": "x"}])
    new_2 = record("c", "1.10.0", started_at=2.0, methods=[{"name": "x"}, {"name": "y"}])
    versions = serving_versions([new_1, old, new_2])
    assert [v.version for v in versions] == ["1.9.2", "1.10.0"]
    assert [w.worker_id for w in versions[1].workers] == ["b", "c"]
    assert versions[1].methods == [{"name": "x"}, {"name": "y"}]  # the newest worker's description
    assert versions[1].to_dict() == {"version": "1.10.0", "methods": new_2.methods, "workers": ["b", "c"]}
    assert serving_versions([]) == []


async def test_every_version_serving_is_listed_with_its_workers(pm: ProcessManager, workers: Workers) -> None:
    workers.start(V1)
    [v1] = workers.wait_registered("versioned", 1)
    v2_proc = workers.start(V2)
    ids = workers.wait_registered("versioned", 2)
    [v2] = set(ids) - {v1}

    [service] = await pm.services()
    assert service.name == "versioned" and service.version == "2.0.0"  # the last registered, as before
    assert [(v.version, [w.worker_id for w in v.workers]) for v in service.versions] == [
        ("1.0.0", [v1]),
        ("2.0.0", [v2]),
    ]
    by_version: dict[str, VersionInfo] = {v.version: v for v in service.versions}
    assert {m["name"] for m in by_version["1.0.0"].methods} == {"hello"}
    assert {m["name"] for m in by_version["2.0.0"].methods} == {"hello", "added"}
    assert service.to_dict()["versions"][1]["workers"] == [v2]

    # v2 goes away: v1 still serves, whatever the services hash last said.
    v2_proc.send_signal(signal.SIGTERM)
    v2_proc.wait(timeout=15)
    [service] = await pm.services()
    assert [v.version for v in service.versions] == ["1.0.0"]
    assert [w.worker_id for w in service.workers] == [v1]


async def test_a_service_with_no_live_worker_has_no_versions(pm: ProcessManager, workers: Workers) -> None:
    proc = workers.start(V1)
    workers.wait_registered("versioned", 1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    assert await pm.services() == []
    [gone] = await list_services(pm.client.redis, pm.client.keys, live_only=False)
    assert (gone.name, gone.version, gone.workers, gone.versions) == ("versioned", "1.0.0", [], [])


def test_titan_services_shows_both_versions(redis_url: str, namespace: str, workers: Workers) -> None:
    workers.start(V1)
    workers.wait_registered("versioned", 1)
    workers.start(V2)
    workers.wait_registered("versioned", 2)
    result = titan(redis_url, namespace, "services", "--json")
    assert result.returncode == 0, result.stderr
    [service] = json.loads(result.stdout)
    assert [v["version"] for v in service["versions"]] == ["1.0.0", "2.0.0"]
    assert [len(v["workers"]) for v in service["versions"]] == [1, 1]
    table = titan(redis_url, namespace, "services")
    assert table.returncode == 0, table.stderr
    assert "1.0.0" in table.stdout and "2.0.0" in table.stdout
    assert "added(n: int) -> int" in table.stdout


# -- titan call to a service nobody serves ---------------------------------------------------


def test_titan_call_to_an_unknown_service_exits_3_at_once(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    started = time.monotonic()
    result = titan(redis_url, namespace, "call", "ghost", "ping", "--timeout", "30")
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 10  # not its 30 s timeout
    assert result.stderr.count("\n") == 1
    assert "unknown service 'ghost'" in result.stderr and "no service has registered yet" in result.stderr

    workers.start(V1)
    workers.wait_registered("versioned", 1)
    result = titan(redis_url, namespace, "call", "ghost", "ping")
    assert result.returncode == 3 and "known: versioned" in result.stderr
    assert json.loads(titan(redis_url, namespace, "call", "versioned", "hello").stdout) == "v1"
