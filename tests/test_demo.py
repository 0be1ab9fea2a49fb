"""The README's demo runs end to end with no Redis configured: it starts and stops its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT


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
    assert "add(5, 3)        = 8" in out
    assert "RemoteError(type='ValueError', message='Division by zero')" in out
    assert "NoLiveWorkers" in out
    assert "all workers stopped" in out
