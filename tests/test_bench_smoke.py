"""bench_core runs end to end on its own private Redis: every call on both sides answered, every
figure present (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_bench_core_quick_answers_every_call_and_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_core", "--quick", "--json", "--workers", "1,2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    for side in ("titan", "loop"):
        assert results["calls"][side] > 0
        assert results["answered"][side] == results["calls"][side]
        assert len(results["a_p50_us"][side]) == results["rounds"] == 1
        assert len(results["spawn_ms"][side]) == 1
        assert results["idle_rss_mib"][side] > 0
    assert set(results["b"]) == {"1", "2"}
    for per_side in results["b"].values():
        for side in ("titan", "loop"):
            (round_,) = per_side[side]
            assert set(round_) == {
                "calls_per_s",
                "redis_commands_per_call",
                "redis_command_us_per_call",
                "cpu_us_per_call_caller",
                "cpu_us_per_call_workers",
                "cpu_us_per_call_redis",
            }
            assert round_["redis_commands_per_call"] > 0
    assert len(results["stream_items_per_s"]) == 1
