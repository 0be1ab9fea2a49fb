"""The README's demo runs end to end with no Redis configured: it starts and stops its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, Workers


@pytest.mark.timeout(90)
def test_demo_runs_with_a_private_redis() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TITAN_REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "examples.usage"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=80,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "started a private redis-server" in out
    assert "add(5, 3)        = 8.0" in out  # a float, as Calculator.add is annotated
    assert "RemoteError(type='ValueError', message='Division by zero')" in out
    assert "NoLiveWorkers" in out
    assert "get_user(1) = User(id=1, name='Ada Lovelace', email='ada@example.org', created_at=" in out
    assert "a User; created_at is a datetime: " in out and " UTC" in out
    assert "after update_user: Ada King" in out
    assert "search_users('HOPPER') = ['Grace Hopper']" in out
    assert "users_since(ada.created_at) = ['Ada King', 'Grace Hopper']" in out
    assert "already exists" in out
    assert "processing 32 images" in out and "pool size now" in out
    assert "process_batch streamed results" in out
    for service in ("calculator", "database", "image-processor"):
        assert f"{service:16} healthy" in out
    assert "Every process with its metrics" in out
    assert "all workers stopped" in out and "demo finished in" in out
    seconds = float(out.rsplit("demo finished in", 1)[1].split()[0])
    assert seconds < 30


@pytest.mark.timeout(90)
def test_remote_caller_uses_workers_started_elsewhere(
    workers: Workers, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    workers.start(ROOT / "processes" / "calculator.py")
    workers.start(ROOT / "processes" / "database.py", "--dep", f'config={{"path": "{tmp_path / "u.db"}"}}')
    workers.start(ROOT / "processes" / "image_processor.py")
    env = {**os.environ, "TITAN_REDIS_URL": redis_url, "TITAN_NAMESPACE": namespace}
    result = subprocess.run(
        [sys.executable, "-m", "examples.remote", "--wait", "30"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=80,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "calculator: 6 * 7 = 42" in result.stdout
    assert "is Remote Caller" in result.stdout
    assert "thumbnail of" in result.stdout and "(96, 72)" in result.stdout
