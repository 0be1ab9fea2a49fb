"""The titan command against live workers: services and call, exit codes and JSON output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from .conftest import CALCULATOR, Workers, titan, wait_until


@pytest.fixture
def calculator(workers: Workers) -> str:
    workers.start(CALCULATOR)
    [wid] = workers.wait_registered("calculator", 1)
    return wid


def test_services_json_lists_live_services(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "services", "--json")
    assert result.returncode == 0, result.stderr
    [service] = json.loads(result.stdout)
    assert service["service"] == "calculator"  # the table's column names
    [version] = service["versions"]
    assert version["version"] == "1.0.0" and version["workers"] == [calculator]
    assert (version["in_flight"], version["calls"]) == (0, 0)
    assert "divide(a: float, b: float) -> float" in [m["signature"] for m in version["methods"]]
    assert "methods" not in service  # listed once, per version


def test_services_table_is_readable(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "services")
    assert result.returncode == 0, result.stderr
    assert "calculator" in result.stdout
    assert "1.0.0" in result.stdout


def test_services_table_shows_decorators_and_streams(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    from .conftest import SERVICES

    workers.start(SERVICES / "decorated.py")
    workers.wait_registered("decorated", 1)
    out = titan(redis_url, namespace, "services").stdout
    assert "[cache ttl=0.5 scope=worker]" in out
    assert "[rate_limit rps=10 scope=service]" in out


def test_services_in_an_empty_namespace(redis_url: str, namespace: str) -> None:
    result = titan(redis_url, namespace, "services", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == []


def test_call_prints_the_result_as_json(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "call", "calculator", "add", "2", "3.5")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == 5.5
    stats = titan(redis_url, namespace, "call", "calculator", "get_stats")
    assert json.loads(stats.stdout) == {"operation_count": 1, "last_operation": "add"}


def test_call_error_exits_1_with_the_remote_message(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "call", "calculator", "divide", "1", "0")
    assert result.returncode == 1
    assert "ValueError: Division by zero" in result.stderr
    assert result.stdout == ""


def test_call_to_an_unknown_service_exits_3_at_once(redis_url: str, namespace: str, calculator: str) -> None:
    started = time.monotonic()
    result = titan(redis_url, namespace, "call", "ghost", "ping", "--timeout", "20")
    assert result.returncode == 3, result.stderr
    assert "unknown service 'ghost'" in result.stderr and "known: calculator" in result.stderr
    assert time.monotonic() - started < 20  # refused at once, not after the call's timeout


def test_call_to_a_service_with_no_live_worker_exits_1(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    proc = workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    result = titan(redis_url, namespace, "call", "calculator", "add", "1", "2", "--timeout", "0.5")
    assert result.returncode == 1, result.stderr
    assert "no live worker" in result.stderr


def test_unreachable_redis_exits_4_in_one_line(namespace: str) -> None:
    result = titan("redis://127.0.0.1:1/0", namespace, "services")
    assert result.returncode == 4
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr
    assert "Traceback" not in result.stderr


def test_redis_url_from_environment(redis_url: str, namespace: str, calculator: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "titan_cli", "call", "calculator", "multiply", "6", "7"],
        capture_output=True, text=True, timeout=30,
        env={"TITAN_REDIS_URL": redis_url, "TITAN_NAMESPACE": namespace, "PATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == 42


def test_workers_health_queues_and_stats(redis_url: str, namespace: str, calculator: str) -> None:
    assert titan(redis_url, namespace, "call", "calculator", "add", "1", "2").returncode == 0
    workers = json.loads(titan(redis_url, namespace, "workers", "--json").stdout)
    assert [w["worker_id"] for w in workers] == [calculator]
    assert workers[0]["status"] == "ready" and workers[0]["service"] == "calculator"
    table = titan(redis_url, namespace, "workers", "calculator")
    assert table.returncode == 0 and calculator in table.stdout

    health = titan(redis_url, namespace, "health", "--json")
    assert health.returncode == 0, health.stderr
    [report] = json.loads(health.stdout)
    assert (report["service"], report["status"], report["healthy_workers"]) == ("calculator", "healthy", 1)
    assert "healthy" in titan(redis_url, namespace, "health").stdout

    [queue] = json.loads(titan(redis_url, namespace, "queues", "--json").stdout)
    assert queue == {"service": "calculator", "waiting": 0, "running": 0, "dead_letters": 0}
    assert "calculator" in titan(redis_url, namespace, "queues").stdout

    # Calls are counted at the worker's heartbeat (about every second).
    def counted() -> list[dict[str, object]]:
        rows = json.loads(titan(redis_url, namespace, "stats", "--json", "--interval", "0.2").stdout)
        return [row for row in rows if row["calls"] >= 1]

    stats = wait_until(counted, 10, "the call in the stats")
    assert stats[0]["service"] == "calculator" and stats[0]["errors"] == 0 and stats[0]["p50_ms"] is not None
    assert "p99 ms" in titan(redis_url, namespace, "stats", "--interval", "0.1").stdout


def test_unknown_service_is_one_line_and_exit_3(redis_url: str, namespace: str, calculator: str) -> None:
    for command in ("workers", "health", "stats"):
        result = titan(redis_url, namespace, command, "nope")
        assert result.returncode == 3, (command, result.stderr)
        assert result.stderr.count("\n") == 1
        assert "unknown service 'nope'" in result.stderr and "known: calculator" in result.stderr


def test_health_exits_1_when_a_service_has_no_live_worker(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    proc = workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    result = titan(redis_url, namespace, "health", "calculator", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)[0]["status"] == "unhealthy"


def test_top_refreshes_then_stops(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "top", "--refresh", "0.2", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert "titan top" in result.stdout and "calculator" in result.stdout
    assert "workers by host" in result.stdout


def test_error_messages_keep_their_brackets(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "call", "calculator", "factorial", "[1, 2]")
    assert result.returncode == 1
    assert "got list ([1, 2])" in result.stderr  # not eaten as rich markup


@pytest.mark.parametrize(
    "args",
    [("services", "--bogus"), ("nosuchcommand",), ("call", "calculator"), ("stats", "--interval", "soon")],
    ids=["unknown option", "unknown command", "missing argument", "bad value"],
)
def test_bad_command_line_exits_2_before_reaching_redis(namespace: str, args: tuple[str, ...]) -> None:
    result = titan("redis://127.0.0.1:1/0", namespace, *args)  # unreachable: it must not matter
    assert result.returncode == 2, result.stderr
    assert "Usage: titan" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["titan_cli", "titan_worker"])
def test_version_is_printed_by_both_commands(command: str) -> None:
    import titan_broker

    done = subprocess.run(
        [sys.executable, "-m", command, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(" " + titan_broker.__version__)
