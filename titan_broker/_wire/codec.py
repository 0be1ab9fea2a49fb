"""msgpack as titan-broker speaks it (PROTOCOL.md, "Values"): rich types out, plain data in, bounded.

Encoding: msgspec writes the msgpack and knows the types the protocol
carries: an aware datetime as the timestamp extension (type -1), a naive one,
a date, a time, a timedelta, a UUID and a Decimal as strings, an enum as its
value, dataclasses, TypedDicts, msgspec Structs and pydantic models as maps,
tuples, NamedTuples and sets as arrays. Integers beyond 64 bits, which msgspec
refuses, go through msgpack-python as extension type 1. Anything else is an
EncodeError naming its type, never a pickle.

Decoding gives plain data (``wire_types`` turns it into what the annotations
say) and is bounded: at most MAX_CONTAINERS arrays and maps, nested at most
MAX_DEPTH deep, unknown extension types refused. msgspec decodes a payload
that cannot hold more than MAX_CONTAINERS arrays and maps (counted from its
bytes, see ``_containers_at_most``); a larger one is decoded by msgpack-python,
which counts them as it goes and stops at the first one too many, before the
payload becomes gigabytes of objects.
"""

from __future__ import annotations

import datetime
import gc
import sys
from itertools import compress
from typing import Any

import msgpack
import msgspec

from .._errors import EncodeError, WireError

MAX_CONTAINERS = 65_536
"""Arrays and maps one payload may hold: 1 MiB of empty maps would otherwise be ~70 MB of objects."""
MAX_DEPTH = 64

EXT_BIGINT = 1
"""msgpack extension type for integers outside 64 bits: signed big-endian two's complement."""

_CONTAINER_HEADERS = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
"""The first byte of every msgpack map (fixmap, map 16, map 32) and array (fixarray, array 16, array 32)."""
_CONTAINERS = frozenset({list, dict, tuple})
"""What decoding makes of arrays and maps (msgspec makes an array used as a map key a tuple)."""
_PASSED_THROUGH = (bytes, bytearray, memoryview, datetime.datetime)
"""Left as they are by ``to_builtins`` on the msgpack-python path: msgpack-python writes them itself."""


def wire_form(value: Any) -> Any:
    """A pydantic model as the map of its fields (msgspec's hook for types it does not know).

    pydantic is never imported here: a model exists only if the program imported it.
    """
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, pydantic.BaseModel):
        return value.model_dump()
    kind = type(value)
    raise TypeError(
        f"a {kind.__name__!r} ({kind.__module__}.{kind.__qualname__}) is not a type that crosses the wire "
        "(PROTOCOL.md, Values, lists those that do)"
    )


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise ValueError(f"unknown msgpack extension type {code}")


_encoder = msgspec.msgpack.Encoder(enc_hook=wire_form)
_decoder = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


def pack(value: Any) -> bytes:
    """Encode a value as msgpack; raise EncodeError naming a type that cannot cross the wire."""
    try:
        return _encoder.encode(value)
    except OverflowError:  # an integer beyond 64 bits
        return _pack_big_integers(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _encode_error(exc) from exc


def _pack_big_integers(value: Any) -> bytes:
    """``pack`` for a value holding integers beyond 64 bits: msgpack-python, with the same encoding."""
    try:
        return msgpack.packb(value, use_bin_type=True, datetime=True, default=_default)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise _encode_error(exc) from exc


def _default(value: Any) -> Any:
    if isinstance(value, int):
        size = (value.bit_length() + 8) // 8
        return msgpack.ExtType(EXT_BIGINT, value.to_bytes(size, "big", signed=True))
    if isinstance(value, datetime.datetime):  # naive (msgpack-python writes aware ones): as msgspec does
        return msgspec.to_builtins(value)
    # Everything else becomes the plain values msgspec would have written (dataclasses maps, ...).
    return msgspec.to_builtins(value, builtin_types=_PASSED_THROUGH, enc_hook=wire_form)


def _encode_error(exc: BaseException) -> EncodeError:
    return EncodeError(WireError.ENCODE_ERROR, f"cannot be encoded as msgpack: {exc}")


def to_builtins(value: Any) -> Any:
    """``value`` as it will arrive, in plain data (datetimes and bytes left as they are): what
    decoding into an annotation starts from. Raises EncodeError like ``pack``."""
    try:
        return msgspec.to_builtins(value, builtin_types=_PASSED_THROUGH, enc_hook=wire_form)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _encode_error(exc) from exc


def unpack(data: bytes) -> Any:
    """Decode one msgpack value (maps may have non-string keys; big integers are ext type 1,
    timestamps datetimes in UTC).

    Raises ValueError (or another msgpack error) on garbage, an unknown
    extension type, more than MAX_CONTAINERS arrays and maps, or nesting
    deeper than MAX_DEPTH.
    """
    bound = _containers_at_most(data)
    if bound > MAX_CONTAINERS:
        return _unpack_counting(data)
    try:
        value = _decoder.decode(data)
    except RecursionError:  # msgspec stops at Python's recursion limit, far beyond ours
        raise ValueError(f"values nested more than {MAX_DEPTH} deep") from None
    if bound > MAX_DEPTH:  # fewer containers cannot nest deeper
        _check_depth(value)
    return value


def _containers_at_most(data: bytes) -> int:
    """An upper bound of the arrays and maps in ``data``, at the speed of one C pass over it: each
    starts with one of _CONTAINER_HEADERS (bytes inside strings and numbers may look the same, so the
    bound can be above the count, never below)."""
    return len(data) - len(data.translate(None, _CONTAINER_HEADERS))


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


def _unpack_counting(data: bytes) -> Any:
    """``unpack`` for a payload that may hold too many arrays and maps: msgpack-python calls the
    counter for each one as it builds it, so decoding stops at the first one too many."""
    counter = _Counter()
    value = msgpack.unpackb(
        data, raw=False, strict_map_key=False, timestamp=3, ext_hook=_ext_hook,
        object_hook=counter, list_hook=counter,
    )  # fmt: skip
    if counter.count > MAX_DEPTH:
        _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """Raise ValueError when arrays and maps nest more than MAX_DEPTH deep.

    Level by level: ``gc.get_referents`` lists the items of lists and tuples
    and the keys and values of dicts in C, and the containers among them are
    picked without a Python-level loop, so a payload of many small maps
    (rows) costs little.
    """
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(MAX_DEPTH):
        if not level:
            return
        children = gc.get_referents(*level)
        level = list(compress(children, map(_CONTAINERS.__contains__, map(type, children))))
    if level:
        raise ValueError(f"values nested more than {MAX_DEPTH} deep")
