"""Internal: the wire format, with no I/O. msgpack as the protocol speaks it (``codec``), requests,
replies and stream items (``protocol``), values decoded into their annotations and checked (``values``),
and every Redis key name (``keys``), the ACL rule of each role built from them (``acl``). PROTOCOL.md is
its specification."""

from . import acl as acl
from .keys import GROUP as GROUP
from .keys import Keys as Keys
from .protocol import safe_str as safe_str
from .values import Mismatch as Mismatch

__all__ = (
    "GROUP",
    "Keys",
    "Mismatch",
    "acl",
    "safe_str",
)
