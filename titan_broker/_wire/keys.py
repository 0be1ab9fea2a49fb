"""Every Redis key titan-broker uses, in one place (documented in PROTOCOL.md).

Keys of one service share the Redis Cluster hash tag ``{<service>}`` so that
every script touches one slot: its streams, its worker records and the
replies to its callers. Only ``<ns>:services`` (the directory) stands alone.

A service sharded over K slots (``@process(shards=K)``) keeps that layout for
its first shard and gives shard k (1 to K-1) the tag ``{<service>#k}``: the
keys a call's scripts touch together (its stream, its reply stream, the
delayed set its retries wait in, its dead letters, the limits its submit
reads) exist once per shard, under the shard's *scope*, and the shards spread
over a cluster's primaries. The registry, affinity streams, jobs and schedules
stay in the first shard, under the service's own tag. ``#`` is not allowed in
a name, so no service's keys can be mistaken for another's shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
"""Service names and namespaces: parts of key names, and of the ACL rules' key patterns, so no
braces, colons, spaces or glob characters."""


def check_name(value: str, what: str) -> str:
    """Refuse names that would break key names (braces, colons, spaces) or widen a key pattern (globs)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is not valid: use letters, digits, '_', '-' and '.', at most 128"
        )
    return value


GROUP = "workers"

USER_MARK = "@"
"""Between a request stream's key and the caller user it belongs to (``<ns>:{<svc>}:calls@<user>``):
in no user name, service name or worker id."""

USER = re.compile(r"[A-Za-z0-9_\-]{1,64}")
"""Caller user names that can have request streams of their own (as ACL rules can be written for)."""

MAX_SHARDS = 64
"""The most slots one service may be sharded over: each worker reads every shard (a connection and a
read loop each), and a client keeps a link per shard it calls (at most 64 links)."""


def shard_scope(service: str, shard: int) -> str:
    """The name inside the hash tag of shard ``shard``'s keys: the service's own for the first
    (so one shard is the unsharded layout, byte for byte), ``<service>#<k>`` for the others."""
    return service if shard == 0 else f"{service}#{shard}"


def shard_scopes(service: str, shards: int) -> list[str]:
    """The scopes of every shard of a service sharded ``shards`` ways, the first shard first."""
    return [shard_scope(service, k) for k in range(shards)]


def scope_service(scope: str) -> str:
    """The service a shard's scope belongs to."""
    return scope.partition("#")[0]


def shards_of(raw: bytes | str | None) -> int:
    """The shard count as the config hash's ``shards`` field holds it (written by ``register.lua``):
    1 when absent, or when it cannot be read (the next registration rewrites it)."""
    try:
        found = int(raw) if raw is not None else 1
    except ValueError:
        return 1
    return found if 1 <= found <= MAX_SHARDS else 1


def check_shards(value: object, what: str) -> int:
    """A shard count: a whole number from 1 to MAX_SHARDS."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHARDS:
        raise ConfigError(f"{what} must be a whole number from 1 to {MAX_SHARDS}, got {value!r}")
    return value


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace."""

    namespace: str = "titan"

    @property
    def services(self) -> str:
        """Hash: service name -> JSON description (version, methods)."""
        return f"{self.namespace}:services"

    def calls(self, service: str) -> str:
        """Stream of requests to a service, read through the consumer group ``workers``."""
        return f"{self.namespace}:{{{service}}}:calls"

    def worker_calls(self, service: str, worker_id: str) -> str:
        """Stream of calls for one worker only: the calls with a key that maps to it (affinity)."""
        return f"{self.namespace}:{{{service}}}:calls:{worker_id}"

    def user_calls(self, scope: str, user: str) -> str:
        """Stream of the requests one registered caller user sends to a service (or one of its
        shards): the ACL rules give each user its own (see ``users``)."""
        return f"{self.calls(scope)}{USER_MARK}{user}"

    def user_worker_calls(self, scope: str, worker_id: str, user: str) -> str:
        """A registered caller user's calls for one worker only (affinity, or handed to it)."""
        return f"{self.worker_calls(scope, worker_id)}{USER_MARK}{user}"

    def users(self, service: str) -> str:
        """Set of the caller users registered for a service, each with request streams of its own
        (written by the operator: ``titan acl caller --apply``; read by workers and callers)."""
        return f"{self.namespace}:{{{service}}}:users"

    @staticmethod
    def stream_user(stream: str) -> str | None:
        """The caller user whose request stream this is (``...calls@<user>``), or None for the
        shared stream and a worker's own."""
        tail = stream.rpartition("}")[2]
        if USER_MARK not in tail:
            return None
        return tail.rpartition(USER_MARK)[2] or None

    def affinity(self, service: str) -> str:
        """Set of the ids of the workers that read a stream of their own."""
        return f"{self.namespace}:{{{service}}}:affinity"

    def stream_control(self, service: str, call_id: str) -> str:
        """Hash with a TTL: a streaming call's flow control (credit) and cancellation, set by its caller."""
        return f"{self.namespace}:{{{service}}}:stream:{call_id}"

    def stream_wake(self, service: str, call_id: str) -> str:
        """List with a TTL: a streaming call's latest credit, pushed by its caller with each grant and
        popped by the worker waiting for it."""
        return f"{self.namespace}:{{{service}}}:stream:{call_id}:wake"

    def config(self, service: str) -> str:
        """Hash: limits a service's workers publish (max_backlog, max_deliveries) and, in the first
        shard's, its shard count (``shards``, absent for one): callers and tools read it there."""
        return f"{self.namespace}:{{{service}}}:config"

    def cache_generation(self, service: str, method: str) -> str:
        """Counter: bumping it invalidates every cached result of ``method``."""
        return f"{self.namespace}:{{{service}}}:cache-gen:{method}"

    def cache_prefix(self, service: str, method: str) -> str:
        """Prefix of the service-scope cache entries of ``method`` (then generation:digest)."""
        return f"{self.namespace}:{{{service}}}:cache:{method}:"

    def rate(self, service: str, method: str, key: str = "") -> str:
        """Hash: the service-wide token bucket of ``method`` (per key when the limit has one)."""
        return f"{self.namespace}:{{{service}}}:rate:{method}" + (f":{key}" if key else "")

    def dead(self, service: str) -> str:
        """Stream of dead-lettered requests of a service."""
        return f"{self.namespace}:{{{service}}}:dead"

    def workers(self, service: str) -> str:
        """Set of the ids of the workers that registered for a service."""
        return f"{self.namespace}:{{{service}}}:workers"

    def idle(self, service: str) -> str:
        """String: when (ms, Redis's clock) a reader first found the service with no live worker.

        Deleted by each worker as it registers; a service idle longer than the registry's
        RETIRED_AFTER is retired (see records.idle_since)."""
        return f"{self.namespace}:{{{service}}}:idle"

    def worker(self, service: str, worker_id: str) -> str:
        """Hash with a TTL: one worker's registry record; it expires when heartbeats stop."""
        return f"{self.namespace}:{{{service}}}:worker:{worker_id}"

    def job(self, service: str, token: str) -> str:
        """Hash: one job's state and, once it ended, its outcome; it expires ``result_ttl`` after."""
        return f"{self.namespace}:{{{service}}}:job:{token}"

    def job_prefix(self, service: str) -> str:
        """Every job hash of a service starts with this (a script builds a job's key from its token)."""
        return f"{self.namespace}:{{{service}}}:job:"

    def jobs(self, service: str) -> str:
        """Sorted set: the service's job ids by submission time (the newest 100,000; pruned as they go)."""
        return f"{self.namespace}:{{{service}}}:jobs"

    def delayed(self, service: str) -> str:
        """Sorted set: calls to run later (delayed, or retried), scored by their due time in Redis's clock."""
        return f"{self.namespace}:{{{service}}}:delayed"

    def delayed_wake(self, service: str) -> str:
        """List of at most one token: a delayed call is due sooner than the workers' next look
        (pushed by ``wake.lua`` in the scripts that add one, as the delayed set's key and ':wake')."""
        return f"{self.delayed(service)}:wake"

    def gone(self, service: str, call_id: str) -> str:
        """String with a TTL: the caller of this call gave up; a later run (delay, @retry) is dropped."""
        return f"{self.gone_prefix(service)}{call_id}"

    def gone_prefix(self, service: str) -> str:
        return f"{self.namespace}:{{{service}}}:gone:"

    def schedule(self, service: str) -> str:
        """Hash: per periodic method, the last tick run (``<method>:last``), the next, and its job."""
        return f"{self.namespace}:{{{service}}}:schedule"

    @staticmethod
    def scope_of(key: str) -> str:
        """The scope of one of a service's keys (``<ns>:{<scope>}:...``): the service, or one of
        its shards (``<svc>#<k>``)."""
        return key.split("{", 1)[1].split("}", 1)[0]

    @staticmethod
    def service_of(key: str) -> str:
        """The service of one of its keys, whichever shard it belongs to."""
        return scope_service(Keys.scope_of(key))

    def reply_prefix(self, service: str) -> str:
        """Every reply key of a service's calls starts with this; its workers write nowhere else."""
        return f"{self.namespace}:{{{service}}}:reply:"

    def reply(self, service: str, client_id: str) -> str:
        """Stream with a TTL: one client's replies from one service (field ``reply``).

        In the service's hash slot, so that a worker answers and acknowledges
        a call in one script on one node (a Redis Cluster refuses a script
        whose keys are in two slots).
        """
        return f"{self.namespace}:{{{service}}}:reply:{client_id}"
