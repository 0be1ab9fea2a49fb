"""The nemesis checker on hand-made histories: each invariant, kept and broken, names its ids."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from .nemesis.checker import LATE_BOUND, REDIS_BOUND, RSS_BOUND, check, load


def ev(event: str, t: float, /, **fields: Any) -> dict[str, Any]:
    return {"k": event, "t": t, **fields}


def call(cid: str, t: float, *, method: str = "echo", timeout: float = 5.0, expect: str = "ok",
         caller: str = "c1") -> dict[str, Any]:  # fmt: skip
    return ev("invoke", t, id=cid, caller=caller, method=method, args="x", timeout=timeout, delay=0.0,
              expect=expect)  # fmt: skip


def ran(cid: str, t: float, nonce: str) -> list[dict[str, Any]]:
    return [
        ev("run_start", t, token=cid, nonce=nonce, pid=1),
        ev("run_end", t + 0.01, token=cid, nonce=nonce, pid=1),
    ]


def ok(cid: str, t: float, nonce: str) -> dict[str, Any]:
    return ev("outcome", t, id=cid, ok=True, value=[cid, nonce, 1])


def failed(cid: str, t: float, error: str) -> dict[str, Any]:
    return ev("outcome", t, id=cid, ok=False, error=error, message="")


def fault(kind: str, start: float, end: float, target: str = "nem-1") -> dict[str, Any]:
    return ev("fault", end, kind=kind, target=target, start=start, end=end)


def healthy() -> list[dict[str, Any]]:
    """A history that keeps every invariant: a call, a job, ticks, a clean stop."""
    return [
        call("c1:1", 1.0), *ran("c1:1", 1.1, "n1"), ok("c1:1", 1.2, "n1"),
        ev("job_submit", 2.0, id="c1:2", job="nem:j2"), *ran("c1:2", 2.1, "n2"),
        ev("job_seen", 3.0, job="nem:j2", by="c2", state="done", attempts=1),
        ev("tick", 4.0, token="tick", nonce="t1", pid=1),
        ev("phase", 5.0, name="healed"),
        ev("tick", 6.0, token="tick", nonce="t2", pid=1),
        ev("job_final", 7.0, job="nem:j2", state="done", value=["c1:2", "n2", 1], error=None, message=""),
        ev("tick_job", 7.5, job="nem:periodic-1", tick_t=4.0, attempts=1, state="done"),
        ev("tick_job", 7.5, job="nem:periodic-2", tick_t=6.0, attempts=1, state="done"),
        ev("memory", 8.0, rss={"nem-1": 50 * 2**20}, redis=2**20),
        ev("worker_exit", 9.0, worker="nem-1", code=0, by="sigterm", output=""),
    ]  # fmt: skip


def violations(events: list[dict[str, Any]]) -> list[str]:
    return check(sorted(events, key=lambda e: e["t"])).violations


def test_a_healthy_history_keeps_every_invariant() -> None:
    verdict = check(healthy())
    assert verdict.ok, verdict.violations
    assert verdict.stats["calls"] == 1 and verdict.stats["jobs"] == 1 and verdict.stats["ticks"] == 2


def test_two_outcomes_for_one_call() -> None:
    [v] = violations([*healthy(), ok("c1:1", 1.3, "n1")])
    assert "call c1:1 (echo) got 2 outcomes" in v


def test_no_outcome_unless_the_caller_was_killed() -> None:
    lost = [call("c1:9", 1.0)]
    [v] = violations([*healthy(), *lost])
    assert "call c1:9 (echo) got no outcome" in v
    assert violations([*healthy(), *lost, fault("caller_kill", 1.5, 1.6, target="c1")]) == []


def test_an_outcome_later_than_the_deadline_and_the_bound() -> None:
    late = [
        call("c1:9", 1.0, timeout=2.0),
        *ran("c1:9", 1.1, "n9"),
        failed("c1:9", 3.0 + LATE_BOUND + 0.5, "CallTimeout"),
    ]
    found = violations([*healthy(), *late, fault("stall", 1.0, 1.5)])
    assert any("call c1:9 (echo) answered 1.50 s after its deadline" in v for v in found), found


def test_a_value_no_run_produced() -> None:
    forged = [call("c1:9", 1.0), *ran("c1:9", 1.1, "n9"), ok("c1:9", 1.2, "other")]
    [v] = violations([*healthy(), *forged])
    assert "call c1:9 (echo) returned run other, which no run of it produced" in v
    stolen = [
        call("c1:8", 1.0),
        *ran("c1:8", 1.1, "n8"),
        ev("outcome", 1.2, id="c1:8", ok=True, value=["c1:7", "n8", 1]),
    ]
    [v] = violations([*healthy(), *stolen])
    assert "call c1:8 (echo) returned ['c1:7', 'n8', 1], not its own value" in v


def test_an_error_is_allowed_only_with_a_fault_in_its_window() -> None:
    timed_out = [call("c1:9", 1.0), failed("c1:9", 6.0, "CallTimeout")]
    [v] = violations([*healthy(), *timed_out])
    assert "call c1:9 (echo) failed with CallTimeout" in v and "no fault" in v
    assert violations([*healthy(), *timed_out, fault("kill9", 2.0, 2.1)]) == []
    # The method's own error is always allowed; a wrong type never is, fault or not.
    boom = [
        call("c1:8", 1.0, method="boom", expect="remote:ValueError"),
        failed("c1:8", 1.2, "remote:ValueError"),
    ]
    assert violations([*healthy(), *boom]) == []
    wrong = [
        call("c1:7", 1.0, method="boom", expect="remote:ValueError"),
        failed("c1:7", 1.2, "remote:KeyError"),
    ]
    [v] = violations([*healthy(), *wrong, fault("kill9", 1.0, 1.1)])
    assert "call c1:7 (boom) failed with remote:KeyError" in v


def test_a_rerun_needs_a_fault_to_explain_it() -> None:
    twice = [call("c1:9", 1.0), *ran("c1:9", 1.1, "a"), *ran("c1:9", 1.5, "b"), ok("c1:9", 1.6, "b")]
    [v] = violations([*healthy(), *twice])
    assert "call c1:9 ran 2 times with no fault to explain it" in v
    verdict = check(sorted([*healthy(), *twice, fault("stall", 1.2, 1.3)], key=lambda e: e["t"]))
    assert verdict.ok and verdict.stats["reruns"] == 1 and verdict.stats["rerun_faults"] == {"stall": 1}
    # Not every fault explains a rerun: a caller killed elsewhere does not.
    [v] = violations([*healthy(), *twice, fault("caller_kill", 1.2, 1.3, target="c7")])
    assert "call c1:9 ran 2 times" in v


def test_a_rerun_explained_by_a_heartbeat_lapse_its_first_worker_logged(tmp_path: Path) -> None:
    """A worker whose heartbeat lapsed past its TTL with no fault done to it (starved of CPU, Redis
    slow) may lose a call it runs to another worker's claim: the lapse, read from that worker's
    log, explains the rerun; the lapse of a worker that did not run it does not."""
    wall = 1_000_000.0  # the wall clock when the monotonic one read 0.5

    def lapse_line(worker: str, at: float, gap: float) -> str:
        stamp = datetime.fromtimestamp(wall + at - 0.5, UTC).isoformat(timespec="milliseconds")
        return (f"{stamp} WARNING titan_worker: worker {worker}: {gap:.2f} s between two heartbeats, "
                "past its TTL of 1.00 s (the process was stopped or starved of CPU, or Redis answered "
                "late): calls it runs may have been taken over by other workers\n")  # fmt: skip

    robbed = [
        ev("phase", 0.5, name="start", wall=wall), call("c1:9", 1.0), ok("c1:9", 2.4, "b"),
        *(ev("worker_start", 0.6, worker=f"nem-{pid}", pid=pid) for pid in (1, 2, 3)),
        *(ev(kind, t, token="c1:9", nonce=nonce, pid=pid) for kind, t, nonce, pid in (
            ("run_start", 1.1, "a", 1), ("run_start", 2.2, "b", 2),
            ("run_end", 2.3, "b", 2), ("run_end", 2.5, "a", 1),
        )),
    ]  # fmt: skip
    (tmp_path / "nemesis.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [*healthy(), *robbed]))
    (tmp_path / "worker-nem-3.log").write_text(lapse_line("nem-3", 2.6, 1.4))
    [v] = check(load(tmp_path)).violations
    assert "call c1:9 ran 2 times with no fault to explain it" in v
    (tmp_path / "worker-nem-1.log").write_text(lapse_line("nem-1", 2.6, 1.4))  # 1.2 s to 2.6 s
    verdict = check(load(tmp_path))
    assert verdict.ok, verdict.violations
    assert verdict.stats["rerun_faults"] == {"lapse": 1} and verdict.stats["faults"]["lapse"] == 2
    assert verdict.stats["lapses_without_fault"] == 2  # no stall, kill or Redis fault behind either


def test_a_run_after_the_caller_gave_up_before_any_worker_took_it() -> None:
    gave_up = [call("c1:9", 1.0, timeout=2.0), failed("c1:9", 3.0, "CallTimeout"), *ran("c1:9", 5.0, "late")]
    found = violations([*healthy(), *gave_up])
    assert any(
        "call c1:9 ran 2.00 s after its caller gave up, before any worker took it" in v for v in found
    ), found


def test_a_job_that_goes_back_from_done_or_never_ends() -> None:
    reverted = ev("job_seen", 3.5, job="nem:j2", by="c3", state="running", attempts=2)
    [v] = violations([*healthy(), reverted])
    assert "job nem:j2 read as 'running' by c3 after it was 'done'" in v
    events = [e for e in healthy() if e["k"] != "job_final"]
    [v] = violations(events)
    assert "job nem:j2 (call c1:2) read back 0 times at the end" in v
    stuck = ev("job_final", 7.0, job="nem:j2", state="running", value=None, error="CallTimeout", message="")
    found = violations([*events, stuck])
    assert any("job nem:j2 (call c1:2) ended as 'running'" in v for v in found), found


def test_a_job_may_be_lost_only_when_redis_lost_data() -> None:
    events = [e for e in healthy() if e["k"] not in ("job_final", "job_seen")]
    lost = ev("job_final", 7.0, job="nem:j2", state="error:JobNotFound", value=None, error="JobNotFound",
              message="lost")  # fmt: skip
    [v] = violations([*events, lost])
    assert "job nem:j2 (call c1:2) not found at the end" in v
    verdict = check(sorted([*events, lost, fault("failover", 2.5, 3.0, "primary:1")], key=lambda e: e["t"]))
    assert verdict.ok and verdict.stats["jobs_lost"] == 1


def test_a_tick_run_twice_and_a_schedule_that_stopped() -> None:
    twice = ev("tick_job", 7.5, job="nem:periodic-3", tick_t=6.5, attempts=2, state="done")
    found = violations([*healthy(), twice])
    assert any("tick nem:periodic-3 ran 2 times with no fault to explain it" in v for v in found), found
    stopped = [e for e in healthy() if not (e["k"] == "tick" and e["t"] > 5)]
    found = violations(stopped)
    assert any("the schedule did not tick" in v for v in found), found


@pytest.mark.parametrize("by", ["itself"])
def test_a_worker_that_died_by_itself_and_memory_past_its_bounds(by: str) -> None:
    died = ev("worker_exit", 3.0, worker="nem-2", code=1, by=by, output="crashed: KeyError")
    [v] = violations([*healthy(), died])
    assert "worker nem-2 exited with 1 by itself" in v and "crashed: KeyError" in v
    killed = ev("worker_exit", 3.0, worker="nem-2", code=-9, by="nemesis")
    assert violations([*healthy(), killed]) == []
    fat = ev("memory", 8.5, rss={"nem-1": RSS_BOUND + 1}, redis=REDIS_BOUND + 1)
    found = violations([*healthy(), fat])
    assert any("a worker's RSS reached" in v for v in found) and any(
        "Redis used_memory reached" in v for v in found
    )


def test_a_worker_that_could_not_reach_redis_as_it_started_during_an_outage() -> None:
    start = ev("worker_start", 2.0, worker="nem-5", pid=55)
    refused = ev("worker_exit", 4.0, worker="nem-5", code=4, by="itself", output="cannot reach Redis")
    found = violations([*healthy(), start, refused])
    assert any("worker nem-5 exited with 4 by itself" in v for v in found), found
    verdict = check(sorted([*healthy(), start, refused, fault("primary_stopped", 1.5, 3.5, "primary:1")],
                           key=lambda e: e["t"]))  # fmt: skip
    assert verdict.ok and verdict.stats["workers_refused_at_start"] == 1
    # Stopped itself while it connected, its connection timed out: the same exit, for that worker only.
    stalled = fault("stall", 2.5, 3.9, "nem-5")
    verdict = check(sorted([*healthy(), start, refused, stalled], key=lambda e: e["t"]))
    assert verdict.ok and verdict.stats["workers_refused_at_start"] == 1
    assert violations([*healthy(), start, refused, fault("stall", 2.5, 3.9, "nem-6")]) != []


def test_two_replies_for_one_call_on_the_wire_unless_one_entry_was_read_twice() -> None:
    first = ev("reply", 1.2, call="default.a-1", worker="nem-1", ok=True, token="c1:1", entry="5-0")
    again = ev("reply", 1.3, call="default.a-1", worker="nem-1", ok=True, token="c1:1", entry="5-0")
    assert violations([*healthy(), first, again]) == []
    other = ev("reply", 1.4, call="default.a-1", worker="nem-2", ok=True, token="c1:1", entry="6-0")
    [v] = violations([*healthy(), first, other])
    assert "call c1:1 answered 2 times on the wire (by ['nem-1', 'nem-2'])" in v
    assert violations([*healthy(), first, other, fault("redis_restart", 1.0, 1.1, "redis")]) == []


def test_a_caller_that_died_by_itself_and_a_workload_that_stopped() -> None:
    spawn = ev("caller_spawn", 1.0, caller="c9", pid=9)
    died = ev("caller_exit", 1.5, caller="c9", code=1, output="RedisUnavailable: cannot reach Redis")
    [v] = violations([*healthy(), spawn, died])
    assert "caller c9 exited with 1 by itself" in v
    verdict = check(sorted([*healthy(), spawn, died, fault("redis_restart", 1.0, 1.2, "redis")],
                           key=lambda e: e["t"]))  # fmt: skip
    assert verdict.ok and verdict.stats["callers_refused_at_start"] == 1
    # Callers all gone long before the workload's time was up: the run checked little, and says so.
    [v] = violations([*healthy(), ev("phase", 0.5, name="start", seconds=100.0)])
    assert "no call was sent for 100 s from t=1: the workload stopped" in v
    assert violations([*healthy(), ev("phase", 0.5, name="start", seconds=20.0)]) == []
