"""The bytes each type becomes on the wire, as PROTOCOL.md ("Values") documents them for clients in
other languages; and plain data as msgpack-python wrote it before msgspec (old and new peers agree)."""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple, TypedDict
from uuid import UUID

import msgpack
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from titan_broker._wire.codec import EXT_BIGINT, MAX_CONTAINERS, EncodeError, pack, unpack


def independent(data: bytes) -> Any:
    """Decoded by msgpack-python with timestamps left as msgpack.Timestamp: what any client reads."""

    def ext(code: int, body: bytes) -> Any:
        return ("ext", code, body)

    return msgpack.unpackb(data, raw=False, strict_map_key=False, timestamp=0, ext_hook=ext)


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 2


class Pair(NamedTuple):
    left: int
    right: str


class Row(TypedDict):
    name: str


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Struct(msgspec.Struct):
    a: int


UTC = UTC


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (datetime(2024, 5, 1, 10, 30, 15, tzinfo=UTC), msgpack.Timestamp(1714559415)),
        (datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=timezone(timedelta(hours=2))),
         msgpack.Timestamp(1714559415, 250_000_000)),
        (datetime(2024, 5, 1, 12, 30, 15, 123456), "2024-05-01T12:30:15.123456"),
        (datetime(2024, 5, 1, 12, 30), "2024-05-01T12:30:00"),
        (date(2024, 5, 1), "2024-05-01"),
        (time(23, 59, 58, 5000), "23:59:58.005000"),
        (time(8, 0, tzinfo=UTC), "08:00:00Z"),
        (timedelta(days=2, seconds=3, microseconds=500), "P2DT3.0005S"),
        (timedelta(seconds=-90), "-PT90S"),
        (UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (Decimal("12.50"), "12.50"),
        (Color.RED, "red"),
        (Level.HIGH, 2),
        (b"\x00\xff", b"\x00\xff"),
        ({3}, [3]),
        (frozenset({4}), [4]),
        ((1, "a"), [1, "a"]),
        (Pair(1, "a"), [1, "a"]),
        (Row(name="ada"), {"name": "ada"}),
        (Point(1, 2), {"x": 1, "y": 2}),
        (Struct(a=1), {"a": 1}),
        (2**64 - 1, 2**64 - 1),
        (2**64, ("ext", EXT_BIGINT, b"\x01" + b"\x00" * 8)),
        (-(2**63) - 1, ("ext", EXT_BIGINT, b"\xff\x7f" + b"\xff" * 7)),
    ],
    ids=repr,
)  # fmt: skip
def test_each_type_has_the_wire_form_protocol_md_documents(value: Any, wire: Any) -> None:
    assert independent(pack(value)) == wire


def test_aware_datetimes_are_the_timestamp_extension_minus_one() -> None:
    data = pack(datetime(2024, 5, 1, 10, 30, 15, tzinfo=UTC))
    assert data[:2] == b"\xd6\xff"  # fixext 4, type -1: timestamp 32
    assert unpack(data) == datetime(2024, 5, 1, 10, 30, 15, tzinfo=UTC)
    assert unpack(data).tzinfo is UTC


def test_integers_beyond_64_bits_keep_every_other_type_as_it_is() -> None:
    """msgspec refuses them: msgpack-python writes the whole value, with the same encoding."""
    value = {"n": 2**80, "at": datetime(2024, 5, 1, tzinfo=UTC), "naive": datetime(2024, 5, 1),
             "points": [Point(1, 2)], "color": Color.RED, "tags": {"x"}, "blob": b"\x01"}  # fmt: skip
    big = independent(pack(value))
    assert big.pop("n") == ("ext", EXT_BIGINT, (2**80).to_bytes(11, "big", signed=True))
    small = independent(pack({k: v for k, v in value.items() if k != "n"}))
    assert big == small
    assert unpack(pack(value))["n"] == 2**80


def test_a_pydantic_model_is_the_map_of_its_fields() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Model(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        at: datetime
        tags: list[str]

    model = Model(at=datetime(2024, 5, 1, tzinfo=UTC), tags=["a"])
    assert independent(pack(model)) == {"at": msgpack.Timestamp(1714521600), "tags": ["a"]}


@pytest.mark.parametrize("value", [object(), lambda: 1, Ellipsis], ids=["object", "lambda", "ellipsis"])
def test_a_value_of_another_type_is_an_encode_error_naming_its_type(value: Any) -> None:
    with pytest.raises(EncodeError, match=rf"'{type(value).__name__}'.* is not a type that crosses the wire"):
        pack({"nested": [value]})


def test_a_value_that_contains_itself_is_an_encode_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(EncodeError):
        pack(loop)


plain = st.recursive(  # what msgpack-python wrote before: no big integers, no other types
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text() | st.integers(-(2**63), 2**64 - 1), inner, max_size=5)
    ),
    max_leaves=20,
)


@given(plain)
def test_plain_data_is_written_as_msgpack_python_wrote_it(value: Any) -> None:
    assert pack(value) == msgpack.packb(value, use_bin_type=True)


@given(plain)
def test_both_decoding_paths_read_the_same_values(value: Any) -> None:
    """The payload is decoded by msgspec, or by msgpack-python when it might hold too many containers."""
    data = pack(value)
    filler = bytes([0x90]) * (MAX_CONTAINERS + 1)
    assert _same(unpack(data), value)
    counted = unpack(pack([filler, value]))
    assert counted[0] == filler and _same(counted[1], value)


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN included."""
    return pack(a) == pack(b)
