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
    # Installed or not (the dev extras install it), the OpenTelemetry SDK is kept out of redis-py's
    # import, and psutil with it.
    assert [m for m in modules if m.startswith("opentelemetry.sdk") or m == "psutil"] == []
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        assert "opentelemetry.trace" not in modules
    assert await probe.add(2, 3) == 5


async def test_an_idle_worker_runs_no_thread_but_its_heartbeat(pm: ProcessManager) -> None:
    # Each thread holds a stack and a malloc arena for the worker's life: the registration runs on
    # the heartbeat's own thread, not on a thread left idle after it.
    probe = await pm.spawn(PROBE)
    names = await probe.threads()
    assert len(names) == 2, names
    assert names[0] == "MainThread" and names[1].startswith("heartbeat-"), names


# redis-py's own metrics, turned on the way its documentation says, in a process that imported
# the worker's package first: the SDK kept out of redis-py's import is there when a program wants it.
REDIS_METRICS = """
import sys
import titan_worker
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import redis
from redis.observability.config import OTelConfig
from redis.observability.providers import get_observability_instance

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
get_observability_instance().init(OTelConfig())
client = redis.Redis.from_url(sys.argv[1])
client.ping()
client.close()
data = reader.get_metrics_data()
print(sorted({m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}))
"""


@pytest.mark.skipif(importlib.util.find_spec("opentelemetry.sdk") is None, reason="needs the SDK")
def test_redis_py_metrics_still_work_in_a_worker_process(redis_url: str) -> None:
    run = subprocess.run([sys.executable, "-c", REDIS_METRICS, redis_url], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "db.client.connection" in run.stdout, run.stdout


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


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--worker-idd", "w1"], "--worker-idd"),  # a misspelt option
        (["--ready-fd", "three"], "--ready-fd"),  # not a number
        (["--name"], "--name"),  # no value
        ([], "FILE"),  # no service file
        ([str(PROBE), "other.py"], "other.py"),  # two files
    ],
)
def test_the_entry_point_names_what_is_wrong_on_its_command_line(args: list[str], named: str) -> None:
    env = {"TITAN_REDIS_URL": "redis://127.0.0.1:1/0", "PATH": ""}
    run = subprocess.run([sys.executable, "-m", "titan_worker.start", *args], capture_output=True, text=True,
                         timeout=60, env=env)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert named.lower() in run.stderr.lower()


def test_the_entry_point_takes_its_options_in_either_form(redis_url: str, namespace: str) -> None:
    # --opt=value as well as --opt value: a missing file is reported (exit 3) only once they parsed.
    missing = str(SERVICES / "no.py")
    run = subprocess.run(
        [sys.executable, "-m", "titan_worker.start", "--worker-id=w1", "--name", "p2", missing],
        capture_output=True, text=True, timeout=60,
        env={"TITAN_REDIS_URL": redis_url, "TITAN_NAMESPACE": namespace, "PATH": ""},
    )  # fmt: skip
    assert run.returncode == 3, run.stderr
    assert "no.py" in run.stderr
