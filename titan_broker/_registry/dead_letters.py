"""Reading, replaying and purging a service's dead letters.

A dead letter is a request that could not be served: delivered more than its
max_deliveries (its workers kept dying on it), or unreadable with no reply
key to answer. Each keeps the original entry whole (see PROTOCOL.md).

A sharded service keeps the dead letters of each shard in that shard's slot,
and a replayed one goes back to its own shard's stream (where its reply key
is). The id of a dead letter of shard k > 0 is its entry id and ``#k``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

from .._errors import TitanError
from .._redis.connection import Redis
from .._wire import protocol
from .._wire.keys import USER, Keys, shard_scope
from .records import service_scopes


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered request."""

    id: str
    service: str
    call_id: str | None
    method: str | None
    reason: str
    deliveries: int
    worker: str
    at: float
    """When it was dead-lettered, seconds since the epoch."""
    entry: dict[bytes, bytes]
    """The original stream entry, field by field."""
    user: str | None = None
    """The registered caller user whose request stream it came from (a replay goes back there)."""

    @property
    def arguments(self) -> Any:
        """The call's ``[args, kwargs]`` when readable, else None."""
        raw = self.entry.get(protocol.F_ARGS)
        try:
            return protocol.unpack(raw) if raw is not None else None
        except Exception:
            return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (the entry's binary fields shown with replacement characters)."""
        return {
            "id": self.id,
            "service": self.service,
            "call_id": self.call_id,
            "method": self.method,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "worker": self.worker,
            "at": self.at,
            "arguments": self.arguments,
            "user": self.user,
        }

    @classmethod
    def from_entry(cls, service: str, entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
        try:
            original = protocol.unpack(fields.get(b"entry", b"\x80"))
        except Exception:
            original = {}
        if not isinstance(original, dict):
            original = {}
        user = protocol.field_text(fields, b"user")
        return cls(
            id=entry_id.decode(),
            service=service,
            call_id=protocol.field_text(fields, protocol.F_ID),
            method=protocol.field_text(fields, protocol.F_METHOD),
            reason=protocol.field_text(fields, b"reason") or "",
            deliveries=int(fields.get(b"deliveries", b"0")),
            worker=protocol.field_text(fields, b"worker") or "",
            at=int(fields.get(b"at", b"0")) / 1000,
            entry={k: v for k, v in original.items() if isinstance(k, bytes) and isinstance(v, bytes)},
            user=user if user is not None and USER.fullmatch(user) else None,
        )


async def list_dead_letters(redis: Redis, keys: Keys, service: str, *, count: int = 100) -> list[DeadLetter]:
    """The oldest ``count`` dead letters of ``service``, every shard's (their ids are times)."""
    letters = []
    for k, scope in enumerate(await service_scopes(redis, keys, service)):
        raw = await redis.xrange(keys.dead(scope), count=count)
        entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", raw)
        for eid, fields in entries:
            letter = DeadLetter.from_entry(service, eid, fields)
            letters.append(replace(letter, id=f"{letter.id}#{k}") if k else letter)
    if len(letters) > count:
        letters.sort(key=lambda d: tuple(int(part) for part in d.id.partition("#")[0].split("-")))
    return letters[:count]


_LETTER_ID = re.compile(r"([0-9]{1,20}-[0-9]{1,20})(?:#([1-9][0-9]{0,2}))?")


def _where(keys: Keys, service: str, letter_id: str) -> tuple[str, str]:
    """The scope of a dead letter's shard, and its entry id there (see the module's doc); a
    TitanError for an id that is not one."""
    found = _LETTER_ID.fullmatch(letter_id) if isinstance(letter_id, str) else None
    if found is None:
        raise TitanError(
            f"{letter_id!r} is not a dead letter id of {service!r}: <ms>-<seq>, and #<shard> for a shard "
            "after the first (as titan dead-letters lists them)"
        )
    entry_id, shard = found.groups()
    return shard_scope(service, int(shard or 0)), entry_id


async def replay_dead_letters(
    redis: Redis,
    keys: Keys,
    service: str,
    ids: list[str] | None = None,
    *,
    timeout: float = 60.0,
    progress: Callable[[int, int], object] | None = None,
) -> int:
    """Put dead letters back on the service's stream, each with a new deadline ``timeout`` away.

    ``ids`` None replays them all. The original caller has gone: the reply
    lands on its reply stream and expires. ``progress(done, total)`` is
    called after each one. Returns how many were replayed.
    """
    for letter_id in ids or ():
        _where(keys, service, letter_id)  # an id that cannot be one is refused, naming it
    letters = await list_dead_letters(redis, keys, service, count=100_000)
    chosen = [d for d in letters if ids is None or d.id in ids]
    # The timeout counts from the new entry's id: a replayed call gets a whole new deadline.
    ttl = str(int(timeout * 1000)).encode()
    for done, letter in enumerate(chosen, 1):
        fields: dict[Any, Any] = {**letter.entry, protocol.F_TIMEOUT: ttl}
        fields.pop(protocol.F_MOVES, None)  # moves off dead workers' streams start again from 0
        scope, entry_id = _where(keys, service, letter.id)
        async with redis.pipeline(transaction=True) as pipe:  # one shard's keys: one slot
            stream = keys.calls(scope) if letter.user is None else keys.user_calls(scope, letter.user)
            pipe.xadd(stream, fields)
            pipe.xdel(keys.dead(scope), entry_id)
            await pipe.execute()
        if progress is not None:
            progress(done, len(chosen))
    return len(chosen)


async def purge_dead_letters(redis: Redis, keys: Keys, service: str, ids: list[str] | None = None) -> int:
    """Delete dead letters (all of them when ``ids`` is None); return how many went."""
    if ids is None:
        count = 0
        for scope in await service_scopes(redis, keys, service):
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xlen(keys.dead(scope))
                pipe.delete(keys.dead(scope))
                deleted, _ = await pipe.execute()
            count += int(deleted)
        return count
    by_scope: dict[str, list[str]] = {}
    for letter_id in ids:
        scope, entry_id = _where(keys, service, letter_id)
        by_scope.setdefault(scope, []).append(entry_id)
    return sum([int(await redis.xdel(keys.dead(scope), *entries)) for scope, entries in by_scope.items()])
