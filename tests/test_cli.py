"""The titan command against live workers: services and call, exit codes and JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import CALCULATOR, Workers


def titan(url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "titan_cli", "--redis", url, "--namespace", namespace, *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.fixture
def calculator(workers: Workers) -> str:
    workers.start(CALCULATOR)
    [wid] = workers.wait_registered("calculator", 1)
    return wid


def test_services_json_lists_live_services(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "services", "--json")
    assert result.returncode == 0, result.stderr
    [service] = json.loads(result.stdout)
    assert service["name"] == "calculator"
    assert service["version"] == "1.0.0"
    assert [w["worker_id"] for w in service["workers"]] == [calculator]
    assert "divide(a: float, b: float) -> float" in [m["signature"] for m in service["methods"]]


def test_services_table_is_readable(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "services")
    assert result.returncode == 0, result.stderr
    assert "calculator" in result.stdout
    assert "1.0.0" in result.stdout


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


def test_call_to_unknown_service_says_no_live_worker(redis_url: str, namespace: str) -> None:
    result = titan(redis_url, namespace, "call", "ghost", "ping", "--timeout", "0.5")
    assert result.returncode == 1
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
