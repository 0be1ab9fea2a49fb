"""Redis ACL rules for each role, as data built from the key layout (documented in PROTOCOL.md).

Four roles: the workers of one service, a caller of some services, the operator
(the CLI's and the dashboard's actions) and the observer (read-only). A rule is
a list of grants: key patterns with the commands allowed on them. The first
grant has no keys (connecting, the cluster's slot map, the clock); each other
becomes a Redis 7 selector, so a command is allowed only on the keys of its own
grant. Every pattern is built from ``Keys``, so the rules follow the namespace.

A caller's own keys (reply streams, marks of calls given up, stream control)
are told apart from another user's by the client id, which starts with the
ACL user's name and a dot (``Client`` reads the name with ``ACL WHOAMI``); its
requests by its own request streams (``calls@<user>``), which it uses once the
user is in the service's ``users`` set (``Rule.registers``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from .keys import USER, Keys, check_name

Role = Literal["worker", "caller", "operator", "observer"]

USER_SEPARATOR = "."
"""Between the ACL user's name and the random part of a client id."""

USER_NAME = USER
"""User names a rule can be written for: no glob character and no separator, so that the
pattern ``<user>.*`` matches this user's keys only."""

# Commands, one tuple per need: changing what a role may do is an edit of one line here.
CONNECT = (
    "ping", "info", "time", "select", "multi", "exec", "discard", "script|load", "command",
    "cluster|slots", "cluster|shards", "cluster|myid", "acl|whoami",
)  # fmt: skip
"""No keys: connecting, the restart check (INFO), Redis's clock, loading scripts, a cluster's slot map."""

WORKER_CONNECT = (*CONNECT, "client|id")
"""A worker's connections: the id of the one blocked on the calls stream, to stop it at shutdown."""

WORKER = (
    "evalsha", "eval", "xreadgroup", "xread", "xadd", "xack", "xdel", "xclaim", "xpending", "xrange", "xlen",
    "xgroup|create", "xgroup|createconsumer", "xgroup|delconsumer", "xinfo|groups", "xinfo|consumers",
    "xinfo|stream", "hset", "hget", "hgetall", "hmget", "hdel", "hincrby", "hkeys", "sadd", "srem",
    "smembers", "exists", "del", "pexpire", "get", "set", "incr", "incrby", "zadd", "zrem", "zrange",
    "zrangebyscore", "zcard", "zscore", "zremrangebyrank", "zrevrange", "lpush", "ltrim", "blpop", "type",
)  # fmt: skip
"""A worker on every key of its own service: serving, settling, retries, schedules, jobs,
dead letters, registration, heartbeats and hand-off. EVAL: a script Redis lost is run with its
source once (then loaded again)."""

DIRECTORY_WRITE = ("hset", "hget", "hgetall", "hkeys")
"""A worker on ``<ns>:services``: it publishes its service's description there."""

CALLER_REPLIES = ("xread", "xtrim", "xdel", "del", "set", "exists", "pexpire", "type", "evalsha", "eval")
"""A caller on its own reply streams and their canaries: read, clean, delete; the restart check as a
script on the canary (a cluster client reaches the node by key). EVAL: a client that sends a script
whole after NOSCRIPT (the Node client)."""

CALLER_CALLS = (
    "evalsha", "eval", "xadd", "xdel", "xlen", "xrange", "xpending", "zadd", "zcard", "zrem", "zscore",
    "zremrangebyrank", "hset", "hget", "hgetall", "hmget", "hdel", "pexpire", "lpush", "ltrim",
)  # fmt: skip
"""A caller on its own request streams, a service's delayed set and jobs: sending (the scripts, whose
keys must all be in one selector), withdrawing, the restart check, reading and cancelling jobs. No
command that lists the delayed set: its members are other callers' requests, arguments included."""

CALLER_JOB_LIST = ("zrevrange",)
"""A caller on a service's job index: listing the newest jobs."""

CALLER_GONE = ("set",)
"""A caller on the marks of its own calls given up."""

CALLER_STREAM_CONTROL = ("hset", "pexpire", "del", "rpush")
"""A caller on the control hashes of its own streaming calls (credit, cancel) and their wake lists
(a grant replaces the token the worker waits on)."""

CALLER_CACHE = ("incrby",)
"""A caller on a service's cache generations (invalidating them)."""

READ = (
    "get", "exists", "type", "ttl", "pttl", "hget", "hgetall", "hmget", "hkeys", "hlen", "smembers",
    "scard", "sismember", "xlen", "xrange", "xrevrange", "xpending", "xinfo|groups", "xinfo|consumers",
    "xinfo|stream", "zcard", "zscore", "zrange", "zrevrange", "zrangebyscore", "zcount",
)  # fmt: skip
"""Reading the registry, queues, jobs, dead letters and metrics (observer; a caller reads a few)."""

REGISTRY_READ = ("hget", "hgetall", "hkeys", "smembers", "sismember", "exists", "xlen")
"""A caller on the registry of the services it calls: live workers, config, streaming methods, and
whether its user is registered (its requests then go to streams of its own)."""

OPERATE = (
    "evalsha", "eval", "xadd", "xdel", "xtrim", "xack", "del", "hset", "hdel", "sadd", "srem", "zrem",
    "zadd", "pexpire", "set", "lpush", "ltrim",
)  # fmt: skip
"""The operator, besides reading: replaying and purging dead letters, cancelling jobs and calls,
forgetting a service, registering caller users (a service's ``users`` set)."""


@dataclass(frozen=True)
class Grant:
    """Commands allowed on keys: each pattern carries its Redis prefix (``~``, ``%R~``, ``%W~``)."""

    keys: tuple[str, ...]
    commands: tuple[str, ...]

    def words(self) -> list[str]:
        return [*self.keys, *(f"+{c}" for c in self.commands)]


@dataclass(frozen=True)
class Rule:
    """One ACL user's rule: who it is for, and its grants (the first one without keys)."""

    role: Role
    user: str
    services: tuple[str, ...]
    grants: tuple[Grant, ...]

    @property
    def registers(self) -> tuple[str, ...]:
        """The services whose ``users`` set must name this user: those it calls (a caller's, and a
        worker's ``--calls``), whose requests it may send to streams of its own only."""
        if self.role == "caller":
            return self.services
        if self.role == "worker":
            return self.services[1:]
        return ()

    def arguments(self, password: str | None = None) -> list[str]:
        """The arguments of ``ACL SETUSER`` after the user's name.

        It replaces whatever the user was allowed before; a password given is
        added as its SHA-256 (``#<hex>``), so the rule can be printed safely.
        """
        words = ["on", "resetkeys", "resetchannels", "clearselectors", "-@all"]
        if password is not None:
            words.append("#" + hashlib.sha256(password.encode()).hexdigest())
        root, *selectors = self.grants
        words += root.words()
        words += ["(" + " ".join(grant.words()) + ")" for grant in selectors]
        return words

    def command(self, password: str | None = None) -> list[str]:
        """The whole ``ACL SETUSER`` command, ready to send."""
        return ["ACL", "SETUSER", self.user, *self.arguments(password)]

    def as_json(self) -> dict[str, object]:
        return {
            "role": self.role,
            "user": self.user,
            "services": list(self.services),
            "grants": [{"keys": list(g.keys), "commands": list(g.commands)} for g in self.grants],
            "setuser": self.command(),
        }


def check_user(user: str) -> str:
    """The user name, or ValueError: a rule's patterns need a name without glob characters or dots."""
    if not isinstance(user, str) or not USER_NAME.fullmatch(user):
        raise ValueError(
            f"ACL user name {user!r} cannot be used in a rule: use 1-64 of A-Z a-z 0-9 _ - "
            "(no dot: the client id is <user>.<random>)"
        )
    return user


def _service(keys: Keys, service: str) -> str:
    """``<ns>:{<svc>}:``: the start of every key of the service."""
    return keys.reply_prefix(service).removesuffix("reply:")


def _shards(service: str) -> tuple[str, str]:
    """The scopes of a service's keys in a pattern: its own tag (the first shard, the registry) and
    any other shard's (``<svc>#<k>``; ``#`` is in no name, so no other service's keys match)."""
    return service, f"{service}#*"


def _caller_grants(keys: Keys, service: str, user: str) -> list[Grant]:
    svc = _service(keys, service)
    own = f"{user}{USER_SEPARATOR}*"
    shards = _shards(service)
    return [
        Grant(tuple(f"~{keys.reply_prefix(s)}{own}" for s in shards), CALLER_REPLIES),
        Grant(
            (
                # its own request streams only: the shared one and other users' hold their arguments
                *(f"~{keys.user_calls(s, user)}" for s in shards),
                *(f"~{keys.user_worker_calls(s, '*', user)}" for s in shards),
                f"~{keys.delayed(service)}*",  # delayed calls and jobs go to the first shard
                f"~{keys.job_prefix(service)}*",
                f"~{keys.jobs(service)}",
            ),
            CALLER_CALLS,
        ),
        Grant((f"~{keys.jobs(service)}",), CALLER_JOB_LIST),
        Grant(tuple(f"~{keys.gone_prefix(s)}{own}" for s in shards), CALLER_GONE),
        Grant(tuple(f"~{keys.stream_control(s, own)}" for s in shards), CALLER_STREAM_CONTROL),
        Grant((f"~{svc}cache-gen:*",), CALLER_CACHE),
        Grant(
            (
                f"%R~{keys.workers(service)}",
                f"%R~{keys.worker(service, '*')}",
                f"%R~{keys.affinity(service)}",
                f"%R~{keys.users(service)}",
                *(f"%R~{keys.config(s)}" for s in shards),
            ),
            REGISTRY_READ,
        ),
    ]


def _directory(keys: Keys) -> Grant:
    return Grant((f"%R~{keys.services}",), ("hget", "hgetall", "hkeys"))


def _checked(keys: Keys, services: tuple[str, ...], user: str) -> tuple[str, ...]:
    """The services, each once and in order, once every name that goes into a pattern is checked:
    a glob character in any of them would widen the rule to other keys."""
    check_name(keys.namespace, "namespace")
    check_user(user)
    return tuple(dict.fromkeys(check_name(s, "service") for s in services))


def worker_rule(keys: Keys, service: str, user: str, calls: tuple[str, ...] = ()) -> Rule:
    """The rule for the workers of ``service``; ``calls``: other services their methods call."""
    service, *others = _checked(keys, (service, *calls), user)
    calls = tuple(others)
    grants = [
        Grant((), WORKER_CONNECT),
        Grant(tuple(f"~{_service(keys, s)}*" for s in _shards(service)), WORKER),
        Grant((f"~{keys.services}",), DIRECTORY_WRITE),
    ]
    for other in calls:
        grants += _caller_grants(keys, other, user)
    return Rule("worker", user, (service, *calls), tuple(grants))


def caller_rule(keys: Keys, services: tuple[str, ...], user: str) -> Rule:
    """The rule for a caller of ``services``, its keys told apart from other users' by ``user``."""
    services = _checked(keys, services, user)
    grants = [Grant((), CONNECT), _directory(keys)]
    for service in services:
        grants += _caller_grants(keys, service, user)
    return Rule("caller", user, services, tuple(grants))


def observer_rule(keys: Keys, user: str) -> Rule:
    """The read-only rule: the registry, queue lengths, jobs, dead letters and metrics."""
    _checked(keys, (), user)
    return Rule("observer", user, (), (Grant((), CONNECT), Grant((f"%R~{keys.namespace}:*",), READ)))


def operator_rule(keys: Keys, user: str) -> Rule:
    """The observer's reads and the actions of the CLI and the dashboard, on every service."""
    _checked(keys, (), user)
    return Rule("operator", user, (), (Grant((), CONNECT), Grant((f"~{keys.namespace}:*",), READ + OPERATE)))
