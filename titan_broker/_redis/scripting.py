"""Lua scripts as data: each lives in ``titan_broker/_redis/lua/<name>.lua`` and runs through ``Script``.

A line ``-- include: NAME`` is replaced by the file ``lua/NAME.lua``
(shared local functions: Redis scripts have no modules), once per script. A script is sent
as EVALSHA with the SHA1 of its source, computed here, so nothing has to be
loaded up front; a Redis that does not know it (it
restarted, or SCRIPT FLUSH) answers NOSCRIPT, and the script is loaded on
that connection and run again. Every script states its KEYS and ARGV at its
top; all the keys one script touches share a hash tag (one cluster slot).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
import redis.cluster
from redis import exceptions as rexc

from .connection import AutoPipeline, Channel, Redis

Target = Redis | Channel | AutoPipeline
"""Anything a command can be sent through."""


async def execute(via: Target, *command: Any) -> Any:
    """Send one command through a pooled client, a channel or an auto-pipeline."""
    if isinstance(via, Channel | AutoPipeline):  # the hot paths: concrete classes, checked first
        return await via.execute(*command)
    return await via.execute_command(*command)  # type: ignore[no-untyped-call,unused-ignore]


def _read(name: str, included: set[str] | None = None) -> str:
    """The source of ``lua/<name>.lua`` with its includes in place, each at most once."""
    included = set() if included is None else included
    included.add(name)
    source = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()
    lines: list[str] = []
    for line in source.splitlines():
        if line.startswith("-- include:"):
            part = line.split(":", 1)[1].strip()
            if part not in included:
                lines.append(_read(part, included))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


class Script:
    """One Lua script, run with EVALSHA and reloaded on NOSCRIPT."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = _read(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def command(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> tuple[Any, ...]:
        """The EVALSHA command that runs the script (for a caller that sends it itself)."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, via: Target) -> None:
        """Load the script into the Redis behind ``via`` (after a NOSCRIPT).

        Through a pooled client, with ``script_load``: a cluster client sends
        it to every primary (a bare SCRIPT LOAD names no key to route by).
        """
        if isinstance(via, Channel | AutoPipeline):
            await via.execute("SCRIPT", "LOAD", self.source)
        else:
            await via.script_load(self.source)

    async def __call__(self, via: Target, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        """Run the script; its errors (ResponseError) and connection errors are raised."""
        return await self._run(via, self.command(keys, args))

    async def _run(self, via: Target, command: Sequence[Any]) -> Any:
        """Run an EVALSHA of this script. Redis lost it (restarted, failed over, SCRIPT FLUSH): load
        it for the next calls and run this one with EVAL, which carries the source and so cannot
        be beaten by another flush between loading and running."""
        try:
            return await execute(via, *command)
        except rexc.NoScriptError:
            await self.load(via)
            return await execute(via, "EVAL", self.source, *command[2:])

    def run_sync(
        self, client: redis.Redis | redis.cluster.RedisCluster, keys: Sequence[Any], args: Sequence[Any] = ()
    ) -> Any:
        """The same, from a thread with a synchronous client (the worker's heartbeat)."""
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        except rexc.NoScriptError:
            client.script_load(self.source)
            return client.execute_command("EVAL", self.source, *command[2:])  # type: ignore[no-untyped-call]

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:8]}>"


class Batch(Script):
    """A script that runs several parts in one call (its source includes ``batch.lua``).

    Parts queued on an auto-pipeline together (``part``) go to Redis as one
    EVALSHA when they share their ``shared`` arguments and their hash tag
    (one cluster slot): one script call, and one pass through Lua's setup,
    for many entries. Each part gets its own answer, or its own error.
    """

    __slots__ = ()

    def part(
        self, via: AutoPipeline, keys: Sequence[Any], args: Sequence[Any], shared: tuple[Any, ...] = ()
    ) -> asyncio.Future[Any]:
        """Queue one part on ``via``; its future gets the part's answer or error (NOSCRIPT is handled)."""
        return via.submit_part(self, shared, keys, args)

    async def __call__(self, via: Target, keys: Sequence[Any], args: Sequence[Any] = (),
                       shared: tuple[Any, ...] = ()) -> Any:  # fmt: skip
        """Run one part alone and return its answer; its error is raised."""
        if isinstance(via, AutoPipeline):
            return await self.part(via, keys, args, shared)
        command = ("EVALSHA", self.sha, len(keys), *keys, len(shared), *shared, len(keys), len(args), *args)
        answers = await self._run(via, command)
        if isinstance(answers[0], Exception):
            raise answers[0]
        return answers[0]
