"""Hand-off between versions: a rolling upgrade, a call only for a worker that has its method."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as sync_redis

from titan_broker import (
    MethodNotFound,
    ProcessManager,
)
from titan_broker._errors import TitanError
from titan_broker._wire.keys import Keys

from .conftest import Workers, in_thread, run_log_dep
from .worker_harness import (
    EDGE,
    EDGE_V1,
    EDGE_V2,
    first_reply,
    pending_count,
    runs,
    send,
)

pytestmark = pytest.mark.anyio


# --- a rolling upgrade -----------------------------------------------------------------------
async def call_new_method(pm: ProcessManager, n: int) -> dict[int, Any]:
    """``n`` calls at once of the method only the new version has: each call's answer or error."""
    outcomes: dict[int, Any] = {}

    async def one(i: int) -> None:
        try:
            outcomes[i] = await pm.client.call("edge-upgrade", "new_method", (i,), timeout=20)
        except TitanError as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return outcomes


async def test_rolling_upgrade_serves_the_new_method_from_the_new_version_only(
    workers: Workers, pm: ProcessManager
) -> None:
    workers.start(EDGE_V1)
    v2 = workers.start(EDGE_V2)
    await in_thread(workers.wait_registered, "edge-upgrade", 2)
    outcomes = await call_new_method(pm, 40)
    failed = {i: repr(o) for i, o in outcomes.items() if isinstance(o, Exception)}
    assert not failed, f"{len(failed)} of 40 calls failed, e.g. {next(iter(failed.values()))}"
    assert outcomes == {i: [i, v2.pid] for i in range(40)}
    started = time.monotonic()
    with pytest.raises(MethodNotFound):
        await pm.client.call("edge-upgrade", "no_such_method", timeout=10)
    assert time.monotonic() - started < 2.0
    assert (await pm.client.call("edge-upgrade", "old_method")).startswith("v")


async def test_a_call_is_handed_only_to_a_worker_that_has_its_method(
    workers: Workers, pm: ProcessManager, keys: Keys, sync_client: sync_redis.Redis
) -> None:
    """Two old workers and a new one: an old worker hands a call for the new method to the new
    worker, never to the other old one (which lacks it too and could only hand it on again)."""
    workers.start(EDGE_V1)
    workers.start(EDGE_V1)
    old = await in_thread(workers.wait_registered, "edge-upgrade", 2)
    v2 = workers.start(EDGE_V2)
    await in_thread(workers.wait_registered, "edge-upgrade", 3)
    outcomes = await call_new_method(pm, 30)
    assert outcomes == {i: [i, v2.pid] for i in range(30)}
    # A hand-off writes onto its target's own stream: an old worker's got nothing, ever.
    for worker_id in old:
        own = keys.worker_calls("edge-upgrade", worker_id)
        added = sync_client.xinfo_stream(own)["entries-added"] if sync_client.exists(own) else 0
        assert added == 0, f"{added} call(s) handed to old worker {worker_id}, which lacks the method"


def test_a_junk_move_count_is_read_as_none_and_the_call_is_served(
    workers: Workers, keys: Keys, sync_client: sync_redis.Redis, tmp_path: Path
) -> None:
    """Field x (moves off dead workers' streams) holding 5,000 digits: int() refuses it, so a worker
    that parsed it unbounded would fail before answering and the entry bounce; it runs once."""
    log = tmp_path / "runs.log"
    workers.start(EDGE, *run_log_dep(log))
    workers.wait_registered("edge", 1)
    reply_key, _ = send(
        sync_client, keys, "edge", "nap", (8, 0.0), mutate=lambda f: f.update({b"x": b"9" * 5000})
    )
    reply = first_reply(sync_client, reply_key, timeout=10)
    assert reply.ok, reply
    assert len(runs(log, "nap 8")) == 1
    assert pending_count(sync_client, keys.calls("edge")) == 0
