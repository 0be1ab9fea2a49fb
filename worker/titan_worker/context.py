"""What every part of a worker shares: who it is, its options, its connections and its clock."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from titan_broker._config import WorkerOptions
from titan_broker._redis import AutoPipeline, Redis
from titan_broker._registry import request_streams
from titan_broker._service import ServiceDefinition
from titan_broker._wire import Keys, shard_scopes

from .logs import ThrottledLog
from .metrics import Metrics

logger = logging.getLogger("titan_worker")


class Clock:
    """Redis's clock as seen from here: deadlines are in Redis's time, not this host's.

    The heartbeat measures the offset between Redis's TIME and this process's
    monotonic clock (halfway through the round trip) every beat, so a host whose
    clock is skewed neither runs stale calls nor drops fresh ones, and a host
    clock that jumps (NTP stepping it, a VM resumed) changes nothing: the wall
    clock is never read.
    """

    __slots__ = ("offset_ms",)

    def __init__(self) -> None:
        self.offset_ms = time.time() * 1000 - time.monotonic() * 1000
        """Redis's time minus time.monotonic(), in ms (the host's own until the first measurement)."""

    def measured(self, time_reply: tuple[int, int], sent: float, received: float) -> None:
        """Record Redis's TIME reply (seconds, microseconds), asked at ``sent`` and answered at
        ``received`` (both time.monotonic())."""
        seconds, micros = time_reply
        self.offset_ms = seconds * 1000 + micros / 1000 - (sent + received) / 2 * 1000

    def now_ms(self) -> float:
        """Redis's time now, in milliseconds since the epoch."""
        return time.monotonic() * 1000 + self.offset_ms

    def monotonic_deadline(self, deadline_ms: int) -> float:
        """The time.monotonic() at which ``deadline_ms`` (Redis's clock) passes."""
        return time.monotonic() + (deadline_ms - self.now_ms()) / 1000


@dataclass(eq=False)
class WorkerContext:
    """The worker's identity, options and shared resources, handed to each of its parts."""

    definition: ServiceDefinition
    options: WorkerOptions
    keys: Keys
    service: str
    worker_id: str
    metrics: Metrics
    clock: Clock = field(default_factory=Clock)
    log: ThrottledLog = field(default_factory=lambda: ThrottledLog(logger))
    redis_: Redis | None = None
    writer_: AutoPipeline | None = None
    shards: int = 1
    """Slots the service's calls are spread over (``@process(shards=...)``); every worker reads all."""
    writers_: dict[str, AutoPipeline] = field(default_factory=dict)
    """The writer of each shard after the first, by scope (a cluster runs each shard's scripts on
    the node of its slot, batched apart)."""
    users: list[str] = field(default_factory=list)
    """The caller users registered for the service (its ``users`` set) as last read, in the order
    first seen: each has a request stream of its own in every shard, which this worker reads too."""
    streams_lost_at_ms: float = 0.0
    """Redis's time when the worker last found the service's stream or group gone (Redis lost its
    data): the entries it held from before are gone with them, not taken over."""

    @property
    def stream(self) -> str:
        """The service's shared calls stream."""
        return self.keys.calls(self.service)

    @property
    def scopes(self) -> list[str]:
        """The scope of each shard's keys, the first shard (the service's own tag) first."""
        return shard_scopes(self.service, self.shards)

    @property
    def streams(self) -> list[str]:
        """Each shard's calls stream, the first shard's (``stream``) first."""
        return [self.keys.calls(scope) for scope in self.scopes]

    def user_streams(self, scope: str) -> list[str]:
        """The request streams of the registered caller users in one shard's scope."""
        return [self.keys.user_calls(scope, user) for user in self.users]

    def own_user_streams(self, scope: str) -> list[str]:
        """This worker's own streams of the registered caller users in one shard's scope."""
        return [self.keys.user_worker_calls(scope, self.worker_id, user) for user in self.users]

    def lane_streams(self, scope: str) -> list[str]:
        """What one shard's read covers: its shared stream, this worker's own stream, and each
        registered user's two (all in the shard's slot, so one XREADGROUP reads them)."""
        return [
            self.keys.calls(scope),
            self.own_stream_of(scope),
            *self.user_streams(scope),
            *self.own_user_streams(scope),
        ]

    def claimable(self, scope: str) -> list[str]:
        """The streams of one shard whose entries any worker may claim from a dead one (not the own
        streams of a worker: those are moved back whole, see ``rescue.lua``)."""
        return request_streams(self.keys, scope, self.users)

    def writer_for(self, scope: str) -> AutoPipeline:
        """The writer for the keys of one shard's scope (see ``writers_``)."""
        return self.writers_.get(scope) or self.writer

    def own_stream_of(self, scope: str) -> str:
        """This worker's own stream in one shard's scope: calls handed to it there (the first
        shard's also takes the calls whose affinity key maps to it)."""
        return self.keys.worker_calls(scope, self.worker_id)

    @property
    def own_stream(self) -> str:
        """Calls whose affinity key maps to this worker (or handed to it by another)."""
        return self.keys.worker_calls(self.service, self.worker_id)

    @property
    def record_key(self) -> str:
        return self.keys.worker(self.service, self.worker_id)

    @property
    def redis(self) -> Redis:
        """The pooled connection (for everything off the hot path)."""
        assert self.redis_ is not None, "worker is not running"
        return self.redis_

    @property
    def writer(self) -> AutoPipeline:
        """The hot path's connection for replies and acknowledgements, batched."""
        assert self.writer_ is not None, "worker is not running"
        return self.writer_
