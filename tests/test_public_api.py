"""The exported names are the public API; changing them is a decision, not an accident."""

from __future__ import annotations

import re
from pathlib import Path

import titan_broker
import titan_broker._errors as errors


def test_exported_names_are_pinned() -> None:
    assert titan_broker.__all__ == (
        "AccessDenied", "AutoScale", "BacklogFull", "BadArguments", "BadRequest", "BadResult", "CallError",
        "CallLost", "CallTimeout", "CircuitBreaker", "CircuitOpen", "Client", "ConfigError", "DeadLetter",
        "DeadLettered", "DeadlineExceeded", "EncodeError", "Event", "Health", "HealthStatus",
        "InternalError", "Job", "JobCancelled", "JobNotFound", "JobState", "JobStatus", "MethodNotFound",
        "NoLiveWorkers", "PayloadTooLarge", "Pool", "PoolMetrics", "ProcessManager", "RateLimited",
        "RedisOutOfMemory", "RedisUnavailable", "RemoteError", "RestartPolicy", "ServiceFileError",
        "ServiceHealth", "ServiceInfo", "ServiceProxy", "SpawnError", "TitanError", "VersionInfo",
        "WorkerInfo", "WorkerOptions", "WorkerProcess", "cache", "health_check", "metric", "on_shutdown",
        "periodic", "process", "public", "rate_limit", "retry", "trace", "with_options",
    )  # fmt: skip
    for name in titan_broker.__all__:
        assert hasattr(titan_broker, name), name


def test_every_public_name_says_what_it_is() -> None:
    undocumented = [
        name for name in titan_broker.__all__ if not (getattr(titan_broker, name).__doc__ or "").strip()
    ]
    assert undocumented == []


def test_every_name_the_readme_imports_from_titan_broker_is_exported() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    imported = {
        name.strip()
        for names in re.findall(r"^from titan_broker import ([\w, ]+)$", readme, re.M)
        for name in names.split(",")
    }
    assert imported, "the README imports nothing from titan_broker"
    assert imported - set(titan_broker.__all__) == set()


def test_every_error_derives_from_titan_error_and_shadows_no_builtin() -> None:
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, BaseException)]
    assert classes
    for cls in classes:
        assert issubclass(cls, titan_broker.TitanError), cls
        assert cls.__name__ not in {"ConnectionError", "TimeoutError"}


def test_no_top_level_worker_or_cli_module_is_installed() -> None:
    import importlib.util

    assert importlib.util.find_spec("titan_worker") is not None
    assert importlib.util.find_spec("titan_cli") is not None
    for name in ("worker", "cli"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "site-packages" not in str(spec.origin), spec
