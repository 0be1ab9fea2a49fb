"""The one place a Redis ACL refusal becomes ``AccessDenied``, naming the command, the key and the role.

Redis says ``NOPERM`` for a command refused outright and, for a command a Lua
script runs, an error that starts "The user executing the script can't" (Redis
7.0) or "ACL failure in script" (later versions).
A transaction whose MULTI was refused shows up as its EXEC's error, "EXEC without
MULTI": redis-py sends MULTI, the commands and EXEC in one write, so Redis ran
the commands one by one (each under the rules) and EXEC found no transaction.
Neither names the key on every Redis version, so the code that ran the command
says what it ran (``command``, ``key``), and the part of titan-broker acting
(``acting``: a caller, a worker, the CLI's operator or observer) says which rule
should have allowed it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import redis.exceptions as rexc

from .._errors import AccessDenied


@dataclass(frozen=True)
class Acting:
    """Who is running commands: the ACL user (None: not known) and the role of the rule it should have."""

    role: str
    user: str | None = None


acting: ContextVar[Acting] = ContextVar("titan_acting", default=Acting("caller"))  # noqa: B039 - frozen
"""Set by the Client (caller), the worker (worker) and the CLI (operator or observer)."""

_SCRIPT_REFUSALS = ("the user executing the script can't", "acl failure in script")
"""How a refusal inside a Lua script begins: Redis 7.0, then later versions."""


_REFUSED_MULTI = "exec without multi"
"""EXEC's answer when the MULTI sent before it was refused (the only way redis-py's pipeline gets it)."""


def _refused_multi(exc: BaseException) -> bool:
    return isinstance(exc, rexc.ResponseError) and str(exc).lower().startswith(_REFUSED_MULTI)


def is_denied(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a command or a key for the user's ACL rules."""
    if isinstance(exc, rexc.NoPermissionError):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).lower().startswith(
        (*_SCRIPT_REFUSALS, _REFUSED_MULTI)
    )


def access_denied(
    exc: BaseException,
    doing: str,
    command: str | None = None,
    key: str | None = None,
    who: Acting | None = None,
) -> AccessDenied:
    """The AccessDenied for ``exc``, raised while ``doing`` (``command`` on ``key`` when known) by ``who``
    (default: ``acting``)."""
    who = who or acting.get()
    user = f"ACL user {who.user!r}" if who.user else "this ACL user"
    if _refused_multi(exc):
        command, key = "MULTI", None
        exc = rexc.ResponseError("its EXEC found no transaction: the commands between ran one by one")
    what = " ".join(part for part in (command and command.upper(), key and f"on key {key!r}") if part)
    return AccessDenied(
        f"cannot {doing}: Redis refused {what or 'it'} for {user}, whose ACL rule does not allow it ({exc}); "
        f"this needs the {who.role} rule (`titan acl {who.role} ...`) for what it is doing"
    )
