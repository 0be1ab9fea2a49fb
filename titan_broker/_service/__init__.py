"""Internal: what a service is. The decorators a service class uses (``decorators``) and the class read
into a ``ServiceDefinition`` of ``MethodSpec``s (``definition``)."""

from .decorators import CacheOptions as CacheOptions
from .decorators import Health as Health
from .decorators import HealthStatus as HealthStatus
from .decorators import MetricOptions as MetricOptions
from .decorators import PeriodicOptions as PeriodicOptions
from .decorators import RateLimitOptions as RateLimitOptions
from .decorators import RetryOptions as RetryOptions
from .decorators import TraceOptions as TraceOptions
from .definition import MethodSpec as MethodSpec
from .definition import ServiceDefinition as ServiceDefinition
from .definition import load_service_file as load_service_file

__all__ = (
    "CacheOptions",
    "Health",
    "HealthStatus",
    "MethodSpec",
    "MetricOptions",
    "PeriodicOptions",
    "RateLimitOptions",
    "RetryOptions",
    "ServiceDefinition",
    "TraceOptions",
    "load_service_file",
)
