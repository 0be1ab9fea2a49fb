"""A spawned worker starts lean: the manager's entry point, and only what its service uses imported."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from titan_broker import ProcessManager

from .conftest import SERVICES

pytestmark = pytest.mark.anyio

PROBE = SERVICES / "probe.py"

# Imported only by the services (or the commands) that use them.
NOT_FOR_AN_IDLE_WORKER = (
    "prometheus_client",  # @metric, @retry, --metrics-port
    "croniter",  # @periodic(cron=...)
    "pydantic",  # pydantic models in a signature
    "typer",  # titan-worker run, titan
    "click",
    "rich",
    "titan_cli",
    "titan_broker._calling.client",  # a service that calls others
    "titan_broker._processes.manager",  # a program that spawns workers
)


async def test_an_idle_worker_has_not_imported_what_its_service_does_not_use(pm: ProcessManager) -> None:
    probe = await pm.spawn(PROBE)
    modules = set(await probe.modules())
    assert "titan_worker.main" not in modules  # the manager's entry point, not titan-worker run
    assert [m for m in NOT_FOR_AN_IDLE_WORKER if m in modules] == []
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        # With the OpenTelemetry SDK installed, redis-py itself imports it (and psutil through it).
        assert [m for m in ("opentelemetry.trace", "psutil") if m in modules] == []
    assert await probe.add(2, 3) == 5


def test_the_entry_point_reports_a_missing_file_with_exit_3(redis_url: str, namespace: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "titan_worker.start", str(SERVICES / "missing.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TITAN_REDIS_URL": redis_url, "TITAN_NAMESPACE": namespace, "PATH": ""},
    )
    assert run.returncode == 3, run.stderr
    assert "missing.py" in run.stderr


def test_the_entry_point_refuses_dependencies_that_are_not_a_json_object(redis_url: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "titan_worker.start", str(PROBE)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TITAN_REDIS_URL": redis_url, "TITAN_DEPENDENCIES": "[1, 2]", "PATH": ""},
    )
    assert run.returncode == 2, run.stderr
    assert "must be a JSON object" in run.stderr
