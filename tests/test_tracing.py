"""@trace: free with only the OpenTelemetry API installed, a span per call once an SDK is configured."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from titan_broker import (
    ProcessManager,
)

from .conftest import SERVICES, Workers

pytestmark = pytest.mark.anyio


DECORATED = SERVICES / "decorated.py"


NO_SDK = '''
import importlib.abc
import sys


class NoSdk(importlib.abc.MetaPathFinder):
    """As if only opentelemetry-api were installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, NoSdk())
'''


async def test_tracing_with_only_the_opentelemetry_api_records_nothing(
    workers: Workers, pm: ProcessManager, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_SDK)  # runs first in the worker's interpreter
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    workers.start(DECORATED, env={"PYTHONPATH": path})
    workers.wait_registered("decorated", 1)
    svc = await pm.connect("decorated")
    assert await svc.traced() == "traced"  # @trace works without an SDK...
    assert await svc.trace_probe() == {"recording": False, "sdk_loaded": False}  # ...and records nothing


async def test_a_traced_call_is_recorded_once_an_sdk_is_configured(
    pm: ProcessManager, tmp_path: Path
) -> None:
    svc = await pm.spawn(DECORATED, dependencies={"spans": str(tmp_path / "spans.jsonl")})
    assert await svc.trace_probe() == {"recording": True, "sdk_loaded": True}  # the probe can tell
