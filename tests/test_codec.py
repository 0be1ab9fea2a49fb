"""The codec's bounds: nesting depth, container counts, extension types, payload sizes."""

from __future__ import annotations

from typing import Any

import pytest

from titan_broker import (
    Client,
    PayloadTooLarge,
)
from titan_broker._wire.keys import Keys

from .conftest import (
    SERVICES,
    Workers,
)


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


pytestmark = pytest.mark.anyio


def test_decoding_accepts_the_deepest_nesting_allowed_and_refuses_one_more() -> None:
    from titan_broker._wire.codec import MAX_DEPTH, pack, unpack

    assert unpack(pack(nested(MAX_DEPTH))) == nested(MAX_DEPTH)
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} deep"):
        unpack(pack(nested(MAX_DEPTH + 1)))
    with pytest.raises(ValueError, match="nested more than"):  # maps count as much as arrays
        unpack(pack({"a": nested(MAX_DEPTH)}))


def test_depth_is_checked_on_the_counting_path_too() -> None:
    """A payload with more bytes that look like array and map headers than MAX_CONTAINERS is decoded by
    msgpack-python, which counts them; the depth limit holds there as well."""
    from titan_broker._wire.codec import MAX_CONTAINERS, MAX_DEPTH, pack, unpack

    filler = bytes([0x90]) * (MAX_CONTAINERS + 1)  # not containers: the bytes of a bin
    assert unpack(pack([filler, nested(MAX_DEPTH - 1)])) == [filler, nested(MAX_DEPTH - 1)]
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} deep"):
        unpack(pack([filler, nested(MAX_DEPTH)]))


def test_decoding_accepts_the_most_arrays_and_maps_allowed_and_refuses_one_more() -> None:
    from titan_broker._wire.codec import MAX_CONTAINERS, pack, unpack

    most = [{}] * (MAX_CONTAINERS - 1)  # and the list itself
    assert unpack(pack(most)) == most
    with pytest.raises(ValueError, match=f"more than {MAX_CONTAINERS} arrays and maps"):
        unpack(pack([*most, {}]))


def test_an_array_as_a_map_key_counts_for_the_depth() -> None:
    """msgspec decodes an array used as a map key into a tuple: it nests like any array."""
    from titan_broker._wire.codec import MAX_DEPTH, unpack

    key = b"\x91" * MAX_DEPTH + b"\x00"  # 64 arrays around 0, the key of a map in an array: 66 deep
    with pytest.raises(ValueError, match="nested more than"):
        unpack(b"\x91\x81" + key + b"\x00")
    # [{}, {key: 0}] with the key 62 arrays deep: 64 in all, allowed (65 headers: the depth is walked)
    assert unpack(b"\x92\x80\x81" + b"\x91" * (MAX_DEPTH - 2) + b"\x00\x00")


@pytest.mark.parametrize("path", ["msgspec", "counting"])
def test_unknown_extension_types_are_refused_on_both_paths(path: str) -> None:
    import msgpack

    from titan_broker._wire.codec import MAX_CONTAINERS, unpack

    filler = bytes([0x90]) * (MAX_CONTAINERS + 1) if path == "counting" else b""
    with pytest.raises(ValueError, match="unknown msgpack extension type 42"):
        unpack(msgpack.packb([filler, msgpack.ExtType(42, b"x")], use_bin_type=True))


async def test_payload_size_limit_is_checked_by_sender_and_receiver(
    workers: Workers, redis_url: str, namespace: str, keys: Keys
) -> None:
    workers.start(SERVICES / "slow.py", "--max-payload", "1000")
    workers.wait_registered("slow", 1)
    async with Client(redis_url, namespace=namespace, max_payload=500) as client:
        with pytest.raises(PayloadTooLarge, match="over the limit of 500"):
            await client.call("slow", "echo", ("x" * 600,))
    async with Client(redis_url, namespace=namespace) as client:
        with pytest.raises(PayloadTooLarge, match="over the limit of 1000"):
            await client.call("slow", "echo", ("x" * 2000,))
        assert await client.call("slow", "echo", ("x" * 100,)) == "x" * 100
