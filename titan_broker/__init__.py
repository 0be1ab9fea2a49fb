"""titan-broker: run Python services as worker processes and call them through typed proxies over Redis."""

from .breaker import CircuitBreaker as CircuitBreaker
from .client import Client as Client
from .config import WorkerOptions as WorkerOptions
from .dead_letters import DeadLetter as DeadLetter
from .decorators import Health as Health
from .decorators import HealthStatus as HealthStatus
from .decorators import cache as cache
from .decorators import health_check as health_check
from .decorators import metric as metric
from .decorators import on_shutdown as on_shutdown
from .decorators import periodic as periodic
from .decorators import process as process
from .decorators import public as public
from .decorators import rate_limit as rate_limit
from .decorators import retry as retry
from .decorators import trace as trace
from .errors import BacklogFull as BacklogFull
from .errors import BadArguments as BadArguments
from .errors import BadRequest as BadRequest
from .errors import BadResult as BadResult
from .errors import CallError as CallError
from .errors import CallLost as CallLost
from .errors import CallTimeout as CallTimeout
from .errors import CircuitOpen as CircuitOpen
from .errors import ConfigError as ConfigError
from .errors import DeadLettered as DeadLettered
from .errors import DeadlineExceeded as DeadlineExceeded
from .errors import EncodeError as EncodeError
from .errors import InternalError as InternalError
from .errors import JobCancelled as JobCancelled
from .errors import JobNotFound as JobNotFound
from .errors import MethodNotFound as MethodNotFound
from .errors import NoLiveWorkers as NoLiveWorkers
from .errors import PayloadTooLarge as PayloadTooLarge
from .errors import RateLimited as RateLimited
from .errors import RedisOutOfMemory as RedisOutOfMemory
from .errors import RedisUnavailable as RedisUnavailable
from .errors import RemoteError as RemoteError
from .errors import ServiceFileError as ServiceFileError
from .errors import SpawnError as SpawnError
from .errors import TitanError as TitanError
from .events import Event as Event
from .health import ServiceHealth as ServiceHealth
from .manager import ProcessManager as ProcessManager
from .manager import WorkerProcess as WorkerProcess
from .pool import AutoScale as AutoScale
from .pool import Pool as Pool
from .pool import PoolMetrics as PoolMetrics
from .pool import RestartPolicy as RestartPolicy
from .proxy import ServiceProxy as ServiceProxy
from .proxy import with_options as with_options
from .registry import ServiceInfo as ServiceInfo
from .registry import WorkerInfo as WorkerInfo

__version__ = "0.1.0"

__all__ = (
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
    "WorkerInfo",
    "WorkerOptions",
    "WorkerProcess",
    "cache",
    "health_check",
    "metric",
    "on_shutdown",
    "process",
    "public",
    "rate_limit",
    "trace",
    "with_options",
)
