"""The exported names are the public API; changing them is a decision, not an accident."""

from __future__ import annotations

import titan_broker
from titan_broker import errors


def test_exported_names_are_pinned() -> None:
    assert titan_broker.__all__ == (
        "AutoScale", "BacklogFull", "BadArguments", "BadRequest", "BadResult", "CallError", "CallLost",
        "CallTimeout", "CircuitBreaker", "CircuitOpen", "Client", "ConfigError", "DeadLetter", "DeadLettered",
        "DeadlineExceeded", "EncodeError", "Event", "Health", "HealthStatus", "InternalError",
        "MethodNotFound", "NoLiveWorkers", "PayloadTooLarge", "Pool", "PoolMetrics", "ProcessManager",
        "RateLimited", "RedisOutOfMemory", "RedisUnavailable", "RemoteError", "RestartPolicy",
        "ServiceFileError", "ServiceHealth",
        "ServiceInfo", "ServiceProxy", "SpawnError", "TitanError", "WorkerInfo", "WorkerOptions",
        "WorkerProcess", "cache", "health_check", "metric", "on_shutdown", "process", "public",
        "rate_limit", "trace", "with_options",
    )  # fmt: skip
    for name in titan_broker.__all__:
        assert hasattr(titan_broker, name), name


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
