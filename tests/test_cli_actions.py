"""The titan and titan-worker commands' edges: options in both places, help, exit codes, JSON,
retired services, acting from the shell (submit, cancel, purge, forget), the worker's start banner
and log formats, and the editable install as type checkers see it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import CALCULATOR, ROOT, SERVICES, Workers, titan, wait_until


@pytest.fixture
def calculator(workers: Workers) -> str:
    workers.start(CALCULATOR)
    [wid] = workers.wait_registered("calculator", 1)
    return wid


def retire(workers: Workers) -> None:
    """Start a calculator, then stop it: a known service with no live worker."""
    proc = workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    workers.killed.add(proc.pid)  # ended on purpose: later waits must not take it for a crash


# --- --redis and --namespace in both places -------------------------------------------------------


def test_redis_and_namespace_are_accepted_after_the_command(
    redis_url: str, namespace: str, calculator: str
) -> None:
    after = titan(redis_url, namespace, "services", "--json", before=False)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)[0]["service"] == "calculator"
    # After the command wins over before it, and both over the environment.
    done = subprocess.run(
        [sys.executable, "-m", "titan_cli", "--redis", "redis://127.0.0.1:1/0", "-n", "elsewhere",
         "call", "calculator", "add", "1", "2", "--redis", redis_url, "-n", namespace],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "TITAN_REDIS_URL": "redis://127.0.0.1:1/0"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 3.0


def test_titan_worker_accepts_redis_and_namespace_before_run(redis_url: str, namespace: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "titan_worker", "--redis", redis_url, "-n", namespace, "run", CALCULATOR],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "TITAN_REDIS_URL"},
    )  # fmt: skip
    try:
        workers = Workers(redis_url, namespace)
        workers.wait_registered("calculator", 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


# --- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("titan_worker", "run"),
        ("titan_cli", "call"),
        ("titan_cli", "services"),
        ("titan_cli", "dead-letters"),
        ("titan_cli",),
    ],
    ids=" ".join,
)
def test_help_shows_metavars_and_whole_option_names(command: tuple[str, ...]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command, "--help"], capture_output=True, text=True, timeout=30,
        env={**os.environ, "COLUMNS": "80", "TERM": "dumb"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for typed in ("<float>", "<str>", "<int>", "<bool>", "<list[str]>", "{"):
        assert typed not in text, (typed, text)
    assert "…" not in text
    assert "--redis URL" in text and "--namespace NAME" in text
    assert "--help " in text and "--help <" not in text
    if command[-1] == "run":
        expected = (
            "--heartbeat-interval SECONDS",
            "--heartbeat-ttl SECONDS",
            "--concurrency N",
            "--dep NAME=JSON",
            "--log-format text|json",
            "Usage: titan-worker run [OPTIONS] FILE",
        )
        for shown in expected:
            assert shown in text, (shown, text)
    if command[-1] == "call":
        assert "Usage: titan call [OPTIONS] SERVICE METHOD [ARGS]..." in text
        assert "--timeout SECONDS" in text


# --- titan call ---------------------------------------------------------------------------------


def test_call_to_a_service_with_no_live_worker_fails_at_once(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    retire(workers)
    started = time.monotonic()
    result = titan(redis_url, namespace, "call", "calculator", "add", "1", "2", "--timeout", "20")
    assert time.monotonic() - started < 10  # not the call's timeout
    assert result.returncode == 1, result.stderr
    assert "no live worker" in result.stderr and "'calculator'" in result.stderr
    assert "wait_for_worker" not in result.stderr  # shell advice, not Python


def test_call_passes_keyword_arguments(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "call", "calculator", "power", "2", "exponent=10")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == 1024.0
    both = titan(redis_url, namespace, "call", "calculator", "subtract", "b=1", "a=5")
    assert json.loads(both.stdout) == 4.0, both.stderr
    mixed = titan(redis_url, namespace, "call", "calculator", "subtract", "a=1", "2")
    assert mixed.returncode == 2 and "positional argument '2' after a keyword argument" in mixed.stderr


def test_call_on_a_streaming_method_prints_items_as_they_come(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    workers.start(SERVICES / "streamer.py")
    workers.wait_registered("streamer", 1)
    result = titan(redis_url, namespace, "call", "streamer", "numbers", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["0", "1", "2"]
    lines = titan(redis_url, namespace, "call", "streamer", "numbers", "n=2", "--json")
    assert [json.loads(line) for line in lines.stdout.splitlines()] == [0, 1]
    failing = titan(redis_url, namespace, "call", "streamer", "then_fail")
    assert failing.returncode == 1 and failing.stdout.splitlines() == ["1", "2"]  # the items before the error
    assert "ValueError: broke after two" in failing.stderr
    assert "async for" not in failing.stderr


def test_call_json_prints_the_result(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "call", "calculator", "multiply", "6", "7", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == 42


# --- exit codes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("dead-letters", "nosuch"),
        ("dead-letters", "nosuch", "--replay"),
        ("jobs", "nosuch"),
        ("job", "nosuch:0123abcd"),
        ("cancel", "nosuch:0123abcd"),
        ("submit", "nosuch", "ping"),
        ("purge", "nosuch", "--yes"),
        ("forget", "nosuch", "--yes"),
    ],
    ids=" ".join,
)
def test_unknown_service_exits_3_in_every_command(
    redis_url: str, namespace: str, calculator: str, command: tuple[str, ...]
) -> None:
    result = titan(redis_url, namespace, *command)
    assert result.returncode == 3, result.stderr
    assert "unknown service 'nosuch'" in result.stderr and "known: calculator" in result.stderr


def test_health_of_an_empty_namespace_says_so_and_fails(redis_url: str, namespace: str) -> None:
    result = titan(redis_url, namespace, "health")
    assert result.returncode == 3
    assert f"no service has registered in namespace {namespace!r}" in result.stderr


# --- retired services ---------------------------------------------------------------------------


def test_a_retired_service_is_listed_apart_and_does_not_fail_health(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    retire(workers)
    workers.start(SERVICES / "streamer.py")
    workers.wait_registered("streamer", 1)
    # Just gone: unhealthy (its workers may have crashed), for --retired-after seconds.
    fresh = titan(redis_url, namespace, "health", "--json")
    assert fresh.returncode == 1
    assert {r["service"]: r["status"] for r in json.loads(fresh.stdout)}["calculator"] == "unhealthy"
    time.sleep(0.6)
    later = titan(redis_url, namespace, "health", "--json", "--retired-after", "0.5")
    assert later.returncode == 0, later.stdout
    rows = {r["service"]: r for r in json.loads(later.stdout)}
    assert rows["calculator"]["status"] == "retired" and rows["streamer"]["status"] == "healthy"
    assert rows["calculator"]["no_worker_since"].endswith("+00:00")
    table = titan(redis_url, namespace, "health", "--retired-after", "0.5")
    assert (
        table.returncode == 0
        and "retired (no live worker for over 0.5 s, not counted): calculator" in table.stdout
    )
    # Named, it must be served.
    assert titan(redis_url, namespace, "health", "calculator", "--retired-after", "0.5").returncode == 1
    # A worker that registers again clears the mark: gone again, it is unhealthy again.
    retire(workers)
    again = titan(redis_url, namespace, "health", "--json", "--retired-after", "0.5")
    assert again.returncode == 1


def test_forget_removes_a_retired_service_but_not_a_live_one(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    proc = workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    refused = titan(redis_url, namespace, "forget", "calculator", "--yes")
    assert refused.returncode == 1 and "has 1 live worker(s)" in refused.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    unasked = titan(redis_url, namespace, "forget", "calculator")
    assert unasked.returncode == 2 and "--yes" in unasked.stderr  # not at a terminal: never silently
    done = titan(redis_url, namespace, "forget", "calculator", "--yes")
    assert done.returncode == 0, done.stderr
    assert titan(redis_url, namespace, "health").returncode == 3  # nothing left in the namespace


# --- tables and JSON ----------------------------------------------------------------------------


def test_idle_percentiles_print_a_dash(redis_url: str, namespace: str, calculator: str) -> None:
    table = titan(redis_url, namespace, "workers", "calculator")
    assert table.returncode == 0, table.stderr
    assert "p50 ms" in table.stdout and "None" not in table.stdout
    row = next(line for line in table.stdout.splitlines() if calculator[:8] in line)
    assert " - " in row
    stats = titan(redis_url, namespace, "stats", "--interval", "0.1")
    assert "None" not in stats.stdout


def test_json_times_are_iso_and_keys_match_the_tables(
    redis_url: str, namespace: str, calculator: str
) -> None:
    [worker] = json.loads(titan(redis_url, namespace, "workers", "--json").stdout)
    assert worker["started_at"].endswith("+00:00") and worker["heartbeat_at"].endswith("+00:00")
    [queue] = json.loads(titan(redis_url, namespace, "queues", "--json").stdout)
    assert set(queue) == {"service", "waiting", "running", "dead_letters"}
    [row] = json.loads(titan(redis_url, namespace, "stats", "--json", "--interval", "0.1").stdout)
    assert {"service", "workers", "calls", "errors", "calls_per_s", "p50_ms", "p95_ms", "p99_ms"} <= set(row)


def test_top_json_and_backlog(redis_url: str, namespace: str, calculator: str) -> None:
    result = titan(redis_url, namespace, "top", "--json", "--refresh", "0.1", "--count", "2")
    assert result.returncode == 0, result.stderr
    views = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(views) == 2 and views[0]["namespace"] == namespace and views[0]["at"].endswith("+00:00")
    [service] = views[0]["services"]
    assert service["service"] == "calculator" and service["waiting"] == 0 and service["dead_letters"] == 0
    assert views[0]["hosts"][0]["workers"] == 1
    table = titan(redis_url, namespace, "top", "--refresh", "0.1", "--count", "1")
    assert "waiting" in table.stdout and "dead letters" in table.stdout


# --- jobs and acting from the shell -------------------------------------------------------------


def test_submit_list_with_due_cancel_and_purge(redis_url: str, namespace: str, workers: Workers) -> None:
    retire(workers)  # known, no worker: submitted jobs wait
    later = titan(redis_url, namespace, "submit", "calculator", "add", "1", "b=2", "--delay", "600")
    assert later.returncode == 0, later.stderr
    job_id = later.stdout.strip()
    assert job_id.startswith("calculator:")
    listed = titan(redis_url, namespace, "jobs", "calculator")
    assert "due" in listed.stdout and job_id in listed.stdout
    [row] = json.loads(titan(redis_url, namespace, "jobs", "calculator", "--json").stdout)
    assert row["id"] == job_id and row["state"] == "queued"
    assert row["due"].endswith("+00:00") and row["submitted"].endswith("+00:00")
    cancelled = titan(redis_url, namespace, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    shown = json.loads(titan(redis_url, namespace, "job", job_id, "--json").stdout)
    assert shown["state"] == "cancelled"
    assert titan(redis_url, namespace, "cancel", job_id).returncode == 0  # cancelled it stays

    submit = ("submit", "calculator", "add", "1", "2", "--json")
    waiting = [json.loads(titan(redis_url, namespace, *submit).stdout)["id"] for _ in range(2)]
    [queue] = json.loads(titan(redis_url, namespace, "queues", "--json").stdout)
    assert queue["waiting"] == 2
    refused = titan(redis_url, namespace, "purge", "calculator")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    purged = titan(redis_url, namespace, "purge", "calculator", "--yes", "--json")
    assert json.loads(purged.stdout) == {"purged": 2}, purged.stderr
    [queue] = json.loads(titan(redis_url, namespace, "queues", "--json").stdout)
    assert queue["waiting"] == 0
    assert json.loads(titan(redis_url, namespace, "job", waiting[0], "--json").stdout)["state"] == "cancelled"


def test_a_failed_job_shows_its_error_as_text(redis_url: str, namespace: str, calculator: str) -> None:
    job_id = titan(redis_url, namespace, "submit", "calculator", "divide", "1", "0").stdout.strip()

    def ended() -> subprocess.CompletedProcess[str] | None:
        shown = titan(redis_url, namespace, "job", job_id)
        return shown if "failed" in shown.stdout else None

    shown = wait_until(ended, 15, "the job to fail")
    assert shown.returncode == 1
    assert "error  ValueError: Division by zero" in shown.stdout
    assert "{'type'" not in shown.stdout


def test_dead_letters_purge_asks_or_needs_yes(redis_url: str, namespace: str, calculator: str) -> None:
    refused = titan(redis_url, namespace, "dead-letters", "calculator", "--purge")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = titan(redis_url, namespace, "dead-letters", "calculator", "--purge", "--yes", "--json")
    assert json.loads(done.stdout) == {"purged": 0}, done.stderr


# --- titan-worker: banner, logs, import errors ----------------------------------------------------


def test_worker_prints_a_start_banner_without_v(redis_url: str, namespace: str, workers: Workers) -> None:
    proc = workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    output = wait_until(
        lambda: workers.output(proc) if b"serving" in workers.output(proc) else None, 10, "banner"
    )
    line = output.decode()
    assert "serving calculator 1.0.0" in line and "add, divide" in line
    assert f"namespace {namespace}" in line and "concurrency 16" in line and redis_url in line
    stamp = line.split()[0]
    assert stamp[:4].isdigit() and "T" in stamp and stamp.endswith("+00:00")  # a readable time


def test_worker_log_format_json(redis_url: str, namespace: str, workers: Workers) -> None:
    proc = workers.start(CALCULATOR, "--log-format", "json", "-v")
    workers.wait_registered("calculator", 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    lines = [json.loads(line) for line in workers.output(proc).decode().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    [banner] = [line for line in lines if line["logger"] == "titan_worker.start"]
    assert banner["service"] == "calculator" and banner["concurrency"] == 16 and "add" in banner["methods"]


def test_an_import_failing_in_a_helper_module_shows_its_traceback_at_v(
    tmp_path: Path, redis_url: str
) -> None:
    (tmp_path / "helpers.py").write_text("import not_installed_anywhere  # noqa\n")
    service = tmp_path / "svc.py"
    service.write_text(
        textwrap.dedent("""
        from titan_broker import process, public
        import helpers

        @process(name="svc", version="1")
        class Svc:
            @public
            async def ping(self) -> str:
                return "pong"
    """)
    )

    def start(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "titan_worker", "run", str(service), "--redis", redis_url, *extra],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    quiet = start()
    assert quiet.returncode == 3
    assert "No module named 'not_installed_anywhere'" in quiet.stderr and "run with -v" in quiet.stderr
    assert "Traceback" not in quiet.stderr
    loud = start("-v")
    assert loud.returncode == 3
    assert "Traceback" in loud.stderr and "helpers.py" in loud.stderr


# --- examples and the editable install ----------------------------------------------------------


def test_examples_run_as_scripts_from_the_root() -> None:
    """``python examples/usage.py`` as well as ``python -m examples.usage`` (test_demo runs that one)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    helped = subprocess.run(
        [sys.executable, "examples/remote.py", "--help"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env=env,
    )  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    assert "--wait" in helped.stdout
    # The demo's imports succeed; it then stops at the unreachable Redis it is given.
    demo = subprocess.run(
        [sys.executable, "examples/usage.py"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**env, "TITAN_REDIS_URL": "redis://127.0.0.1:1/0"},
    )  # fmt: skip
    assert "ModuleNotFoundError" not in demo.stderr
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in demo.stderr


@pytest.mark.timeout(180)
def test_the_editable_install_is_seen_by_type_checkers_outside_the_repository(tmp_path: Path) -> None:
    """`make install` (pip install -e, editable_mode=strict): mypy in another project finds the package
    and its py.typed, so a typed caller is checked against titan-broker's annotations."""
    (tmp_path / "caller.py").write_text(
        textwrap.dedent("""
            from titan_broker import ProcessManager

            async def count() -> int:
                async with ProcessManager() as pm:
                    return await pm.workers_of("calculator")  # a list of WorkerInfo, not an int
        """)
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "caller.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=170,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")},
    )  # fmt: skip
    assert "Cannot find implementation or library stub" not in done.stdout, done.stdout
    expected = 'Incompatible return value type (got "list[WorkerInfo]", expected "int")'
    assert expected in done.stdout, done.stdout
