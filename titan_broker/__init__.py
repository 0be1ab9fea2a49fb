"""titan-broker: run Python services as worker processes and call them through typed proxies over Redis."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._config import WorkerOptions as WorkerOptions
from ._errors import AccessDenied as AccessDenied
from ._errors import BacklogFull as BacklogFull
from ._errors import BadArguments as BadArguments
from ._errors import BadRequest as BadRequest
from ._errors import BadResult as BadResult
from ._errors import CallError as CallError
from ._errors import CallLost as CallLost
from ._errors import CallTimeout as CallTimeout
from ._errors import CircuitOpen as CircuitOpen
from ._errors import ConfigError as ConfigError
from ._errors import DeadLettered as DeadLettered
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import EncodeError as EncodeError
from ._errors import InternalError as InternalError
from ._errors import JobCancelled as JobCancelled
from ._errors import JobNotFound as JobNotFound
from ._errors import MethodNotFound as MethodNotFound
from ._errors import NoLiveWorkers as NoLiveWorkers
from ._errors import PayloadTooLarge as PayloadTooLarge
from ._errors import RateLimited as RateLimited
from ._errors import RedisOutOfMemory as RedisOutOfMemory
from ._errors import RedisUnavailable as RedisUnavailable
from ._errors import RemoteError as RemoteError
from ._errors import ServiceFileError as ServiceFileError
from ._errors import SpawnError as SpawnError
from ._errors import TitanError as TitanError
from ._service.decorators import Health as Health
from ._service.decorators import HealthStatus as HealthStatus
from ._service.decorators import cache as cache
from ._service.decorators import health_check as health_check
from ._service.decorators import metric as metric
from ._service.decorators import on_shutdown as on_shutdown
from ._service.decorators import periodic as periodic
from ._service.decorators import process as process
from ._service.decorators import public as public
from ._service.decorators import rate_limit as rate_limit
from ._service.decorators import retry as retry
from ._service.decorators import trace as trace

if TYPE_CHECKING:
    from ._calling.breaker import CircuitBreaker as CircuitBreaker
    from ._calling.client import Client as Client
    from ._calling.jobs import Job as Job
    from ._calling.jobs import JobState as JobState
    from ._calling.jobs import JobStatus as JobStatus
    from ._calling.proxy import ServiceProxy as ServiceProxy
    from ._calling.proxy import with_options as with_options
    from ._processes.events import Event as Event
    from ._processes.manager import ProcessManager as ProcessManager
    from ._processes.manager import WorkerProcess as WorkerProcess
    from ._processes.pool import AutoScale as AutoScale
    from ._processes.pool import Pool as Pool
    from ._processes.pool import PoolMetrics as PoolMetrics
    from ._processes.pool import RestartPolicy as RestartPolicy
    from ._registry.dead_letters import DeadLetter as DeadLetter
    from ._registry.health import ServiceHealth as ServiceHealth
    from ._registry.records import ServiceInfo as ServiceInfo
    from ._registry.records import VersionInfo as VersionInfo
    from ._registry.records import WorkerInfo as WorkerInfo

# The calling side, the registry and the process manager are imported when first used: a worker
# process (which needs only the decorators, its service and the errors) stays lean.
_LAZY = {
    "CircuitBreaker": "._calling.breaker",
    "Client": "._calling.client",
    "Job": "._calling.jobs",
    "JobState": "._calling.jobs",
    "JobStatus": "._calling.jobs",
    "ServiceProxy": "._calling.proxy",
    "with_options": "._calling.proxy",
    "Event": "._processes.events",
    "ProcessManager": "._processes.manager",
    "WorkerProcess": "._processes.manager",
    "AutoScale": "._processes.pool",
    "Pool": "._processes.pool",
    "PoolMetrics": "._processes.pool",
    "RestartPolicy": "._processes.pool",
    "DeadLetter": "._registry.dead_letters",
    "ServiceHealth": "._registry.health",
    "ServiceInfo": "._registry.records",
    "VersionInfo": "._registry.records",
    "WorkerInfo": "._registry.records",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'titan_broker' has no attribute {name!r}")
    value = getattr(_modules()[module], name)
    globals()[name] = value
    return value


def _modules() -> dict[str, ModuleType]:
    from ._calling import breaker, client, jobs, proxy
    from ._processes import events, manager, pool
    from ._registry import dead_letters, health, records

    return {
        "._calling.breaker": breaker,
        "._calling.client": client,
        "._calling.jobs": jobs,
        "._calling.proxy": proxy,
        "._processes.events": events,
        "._processes.manager": manager,
        "._processes.pool": pool,
        "._registry.dead_letters": dead_letters,
        "._registry.health": health,
        "._registry.records": records,
    }


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = (
    "AccessDenied",
    "AutoScale",
    "BacklogFull",
    "BadArguments",
    "BadRequest",
    "BadResult",
    "CallError",
    "CallLost",
    "CallTimeout",
    "CircuitBreaker",
    "CircuitOpen",
    "Client",
    "ConfigError",
    "DeadLetter",
    "DeadLettered",
    "DeadlineExceeded",
    "EncodeError",
    "Event",
    "Health",
    "HealthStatus",
    "InternalError",
    "Job",
    "JobCancelled",
    "JobNotFound",
    "JobState",
    "JobStatus",
    "MethodNotFound",
    "NoLiveWorkers",
    "PayloadTooLarge",
    "Pool",
    "PoolMetrics",
    "ProcessManager",
    "RateLimited",
    "RedisOutOfMemory",
    "RedisUnavailable",
    "RemoteError",
    "RestartPolicy",
    "ServiceFileError",
    "ServiceHealth",
    "ServiceInfo",
    "ServiceProxy",
    "SpawnError",
    "TitanError",
    "VersionInfo",
    "WorkerInfo",
    "WorkerOptions",
    "WorkerProcess",
    "cache",
    "health_check",
    "metric",
    "on_shutdown",
    "periodic",
    "process",
    "public",
    "rate_limit",
    "retry",
    "trace",
    "with_options",
)
