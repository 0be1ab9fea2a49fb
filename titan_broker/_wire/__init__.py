"""Internal: the wire format, with no I/O. msgpack as the protocol speaks it (``codec``), requests,
replies and stream items (``protocol``), values decoded into their annotations and checked (``values``),
and every Redis key name (``keys``), the ACL rule of each role built from them (``acl``). PROTOCOL.md is
its specification."""

from . import acl as acl
from .keys import GROUP as GROUP
from .keys import MAX_SHARDS as MAX_SHARDS
from .keys import USER as USER
from .keys import USER_MARK as USER_MARK
from .keys import Keys as Keys
from .keys import check_shards as check_shards
from .keys import shard_scope as shard_scope
from .keys import shard_scopes as shard_scopes
from .keys import shards_of as shards_of
from .protocol import safe_str as safe_str
from .values import Mismatch as Mismatch

__all__ = (
    "GROUP",
    "MAX_SHARDS",
    "USER",
    "USER_MARK",
    "Keys",
    "Mismatch",
    "acl",
    "check_shards",
    "safe_str",
    "shard_scope",
    "shard_scopes",
    "shards_of",
)
