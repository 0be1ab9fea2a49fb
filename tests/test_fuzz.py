"""Thousands of random entries written straight onto a request stream: the worker keeps serving."""

from __future__ import annotations

import time

import pytest
import redis as sync_redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from titan_broker._wire.keys import GROUP, Keys
from titan_broker._wire.protocol import pack

from .conftest import CALCULATOR, Workers, wait_until


def entries(keys: Keys) -> st.SearchStrategy[dict[bytes, bytes]]:
    """Request entries from plausible to garbage, field by field."""
    now = int(time.time() * 1000)
    values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=20)
        | st.binary(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
        max_leaves=8,
    )
    args = st.one_of(
        st.tuples(st.lists(values, max_size=4), st.dictionaries(st.text(max_size=5), values, max_size=3)).map(
            lambda a: pack(list(a))
        ),
        values.map(pack),
        st.binary(max_size=64),
    )
    fields = {
        b"v": st.sampled_from([b"3", b"3", b"2", b"", b"\xff"]) | st.binary(max_size=4),
        b"id": st.text(max_size=12).map(str.encode) | st.binary(max_size=12),
        b"m": st.sampled_from(
            ["add", "divide", "factorial", "get_stats", "_record", "init", "__class__", "nope"]
        ).map(str.encode)
        | st.binary(max_size=12),
        b"a": args,
        b"r": st.sampled_from(
            [keys.reply("calculator", "fuzz").encode()] * 4
            + [b"elsewhere:reply:x", keys.services.encode(), b"", b"\x00"]
        ),
        b"d": st.sampled_from([str(now + 60_000).encode(), str(now - 1000).encode(), b"-5", b"x"]),
        b"t": st.binary(max_size=16),
    }
    junk = st.dictionaries(st.binary(min_size=1, max_size=6), st.binary(max_size=16), max_size=3)
    return st.builds(
        lambda chosen, extra: {**chosen, **extra},
        st.fixed_dictionaries({}, optional=fields),
        junk,
    ).filter(bool)


@pytest.mark.timeout(180)
def test_random_entries_never_stop_the_worker(
    workers: Workers, redis_url: str, namespace: str, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    proc = workers.start(CALCULATOR)
    workers.wait_registered("calculator", 1)
    stream = keys.calls("calculator")
    written = 0

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(entries(keys), min_size=20, max_size=60))
    def write(batch: list[dict[bytes, bytes]]) -> None:
        nonlocal written
        pipe = sync_client.pipeline(transaction=False)
        for fields in batch:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        pipe.execute()
        written += len(batch)

    write()
    assert written >= 2000
    wait_until(lambda: sync_client.xlen(stream) == 0, 60, "the worker to settle every entry")
    replies, dead = (
        sync_client.xlen(keys.reply("calculator", "fuzz")),
        sync_client.xlen(keys.dead("calculator")),
    )
    print(f"\nfuzz: {written} random entries: {replies} answered with a reply, {dead} dead-lettered")
    assert sync_client.xpending(stream, GROUP)["pending"] == 0
    assert proc.poll() is None
    # No reply landed outside the namespace's reply keys.
    assert not sync_client.exists("elsewhere:reply:x")
    assert sync_client.type(keys.services) == b"hash"
    # And a normal call still works.
    from .conftest import titan

    result = titan(redis_url, namespace, "call", "calculator", "add", "2", "3")
    assert (result.returncode, result.stdout.strip()) == (0, "5.0")  # add(a: float, b: float) -> float
