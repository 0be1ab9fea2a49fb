"""msgpack as titan-broker speaks it: big integers as extension type 1, and bounded decoding.

Only msgpack's own types cross the wire (nil, bool, int, float, str, bin,
array, map); a value it cannot encode is an EncodeError, never a pickle.
Decoding refuses unknown extension types and bounds what a payload may
become in memory: at most MAX_CONTAINERS arrays and maps, nested at most
MAX_DEPTH deep.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import EncodeError, WireError

MAX_CONTAINERS = 65_536
"""Arrays and maps one payload may hold: 1 MiB of empty maps would otherwise be ~70 MB of objects."""
MAX_DEPTH = 64

EXT_BIGINT = 1
"""msgpack extension type for integers outside 64 bits: signed big-endian two's complement."""


def _default(value: Any) -> Any:
    if isinstance(value, int):
        size = (value.bit_length() + 8) // 8
        return msgpack.ExtType(EXT_BIGINT, value.to_bytes(size, "big", signed=True))
    raise TypeError(f"cannot serialize {type(value).__name__!r} object")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise ValueError(f"unknown msgpack extension type {code}")


class _Counter:
    """Counts the arrays and maps of one decode; raises past MAX_CONTAINERS."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, value: Any) -> Any:
        self.count += 1
        if self.count > MAX_CONTAINERS:
            raise ValueError(f"more than {MAX_CONTAINERS} arrays and maps")
        return value


def pack(value: Any) -> bytes:
    """Encode a value with msgpack; raise EncodeError naming the type that cannot be encoded."""
    try:
        return msgpack.packb(value, use_bin_type=True, default=_default)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(WireError.ENCODE_ERROR, f"cannot encode with msgpack: {exc}") from exc


def unpack(data: bytes) -> Any:
    """Decode one msgpack value (maps may have non-string keys; big integers are ext type 1).

    Raises ValueError (or another msgpack error) on garbage, an unknown
    extension type, more than MAX_CONTAINERS arrays and maps, or nesting
    deeper than MAX_DEPTH.
    """
    counter = _Counter()
    value = msgpack.unpackb(
        data, raw=False, strict_map_key=False, ext_hook=_ext_hook, object_hook=counter, list_hook=counter
    )
    if counter.count > MAX_DEPTH:  # fewer containers cannot nest deeper
        _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"values nested more than {MAX_DEPTH} deep")
        if isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, list | dict))
        elif isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values() if isinstance(child, list | dict))
