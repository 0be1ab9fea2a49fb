"""Reads a nemesis run's history and names every broken invariant with the ids at fault.

The invariants (each violation is one line of ``Verdict.violations``):

- calls: every call has exactly one outcome (none only when its caller was killed), and none
  later than its deadline plus ``LATE_BOUND``;
- values: a success's value is the one a run of that call produced (its token and the run's
  nonce), a stream's items come in order without a gap; an error is the method's own, or one
  of ``FAULT_ERRORS`` with a fault in the call's window;
- reruns: a call runs more than once only with a fault that explains it in its window (a worker
  killed, stalled, cut off or its clock shifted, Redis restarted or failed over, or a heartbeat
  lapse past the TTL that the worker which ran it logged), and never after its caller gave up
  before any worker took it;
- jobs: every job ends in exactly one state, read back by id from another process, the same
  state every time once ended (or reported lost, only after Redis lost data);
- ticks: a periodic tick never runs twice, and the schedule ticks again after the faults heal;
- processes: no worker exits but by the nemesis's hand (or 0 on SIGTERM at the end); worker RSS
  and Redis memory stay under ``RSS_BOUND`` and ``REDIS_BOUND``.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .history import read

LATE_BOUND = 1.0
"""Seconds an outcome may come after the call's deadline (timeout, plus its delay)."""
RECOVERY = 5.0
"""Seconds after a fault heals during which it still explains a rerun or an error (a dead worker's
calls are claimed 1 s after its heartbeat TTL; a promoted replica is found within a few seconds)."""
RSS_BOUND = 400 * 1024 * 1024
REDIS_BOUND = 256 * 1024 * 1024
WORKLOAD_GAP = 30.0
"""Seconds the workload may go without sending a call (every loop waiting out a failover at once)."""
TICK_RESUME = 4.0
"""Seconds after everything healed within which the schedule must have ticked."""

FAULT_ERRORS = {
    "CallTimeout",
    "NoLiveWorkers",
    "DeadlineExceeded",
    "RedisUnavailable",
    "CallLost",
    "InternalError",
    "DeadLettered",
    "BacklogFull",
}
"""What a call may fail with when a fault is in its window (README: "Errors")."""
RERUN_FAULTS = {"kill9", "stall", "partition", "clock", "redis_restart", "failover", "primary_stopped",
                "keys_deleted", "lapse"}  # fmt: skip
"""Faults that may make a call run again: its worker lost (killed, stalled, cut off, its record
deleted, its clock shifted, or its heartbeat lapsed past the TTL with no fault done to it: the
process starved of CPU or Redis slow to answer, which the worker logs) or the acknowledgement lost
with Redis."""
CAUSES = [
    "kill9",
    "stall",
    "partition",
    "keys_deleted",
    "failover",
    "primary_stopped",
    "redis_restart",
    "clock",
    "lapse",
]
"""The likeliest cause first, to say which fault explains a rerun when several could."""
DATA_LOSS = {"failover", "primary_stopped", "redis_restart"}
"""Faults after which Redis may have lost a job (asynchronous replication)."""


@dataclass
class Verdict:
    violations: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "violations": self.violations, "stats": self.stats}

    def summary(self) -> str:
        s = self.stats
        faults = ", ".join(f"{k} {v}" for k, v in sorted(s.get("faults", {}).items()))
        lines = [
            f"{s.get('calls', 0)} calls, {s.get('jobs', 0)} jobs, {s.get('ticks', 0)} ticks checked; "
            f"faults: {faults or 'none'}",
            f"reruns {s.get('reruns', 0)} (explained by: {s.get('rerun_faults', {})}); heartbeat lapses "
            f"with no fault done {s.get('lapses_without_fault', 0)}; "
            f"worst lateness past a deadline {s.get('worst_late', 0.0):.2f} s; "
            f"errors under faults {s.get('fault_errors', {})}",
            f"max worker RSS {s.get('max_rss', 0) / 2**20:.0f} MiB, max Redis used_memory "
            f"{s.get('max_redis', 0) / 2**20:.1f} MiB",
        ]
        if self.violations:
            lines.append(f"{len(self.violations)} violation(s):")
            lines += [f"  - {v}" for v in self.violations[:50]]
        else:
            lines.append("no violation")
        return "\n".join(lines)


LAPSE = re.compile(
    r"^(\S+) WARNING titan_worker: worker (\S+): ([\d.]+) s between two heartbeats, past its TTL"
)
"""The line a worker logs when its heartbeat lapsed past its TTL (worker/titan_worker/liveness.py)."""


def load(folder: Path) -> list[dict[str, Any]]:
    """The run's history, with each heartbeat lapse its workers logged as a fault of kind ``lapse``."""
    events = read(folder)
    start = next((e for e in events if e["k"] == "phase" and e.get("name") == "start"), None)
    # Worker logs are stamped by the wall clock, the history by the monotonic one.
    offset = start["wall"] - start["t"] if start and "wall" in start else time.time() - time.monotonic()
    lapses = []
    for log in sorted(folder.glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = LAPSE.match(line)
            if m:
                end = datetime.fromisoformat(m[1]).timestamp() - offset
                lapses.append({"k": "fault", "t": end, "kind": "lapse", "target": m[2],
                               "start": end - float(m[3]), "end": end})  # fmt: skip
    return sorted([*events, *lapses], key=lambda e: float(e["t"]))


WORKER_FAULTS = {"kill9", "stall", "partition", "clock", "keys_deleted", "lapse"}
"""Faults done to one worker: they explain a rerun only of a call that worker ran."""


class _Faults:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.all = [e for e in events if e["k"] == "fault"]
        self.pids: dict[str, int] = {e["worker"]: e["pid"] for e in events if e["k"] == "worker_start"}
        netns = [w for w in self.pids if w.endswith("-ns")]
        for f in self.all:
            if f["kind"] == "partition":
                f.setdefault("pids", [self.pids[w] for w in netns])

    def within(self, start: float, end: float, kinds: set[str] | None = None) -> list[dict[str, Any]]:
        """Faults under way (or recovering) at some moment of [start, end]."""
        return [f for f in self.all if (kinds is None or f["kind"] in kinds)
                and f["start"] <= end and f["end"] + RECOVERY >= start]  # fmt: skip

    def hit(self, fault: dict[str, Any], pids: set[int]) -> bool:
        """Whether ``fault`` could have cost one of the workers ``pids`` its calls."""
        if fault["kind"] not in WORKER_FAULTS:
            return True  # Redis itself: every worker's
        if "pids" in fault:
            return bool(pids & set(fault["pids"]))
        pid = self.pids.get(fault["target"])
        return pid is None or pid in pids


def check(events: list[dict[str, Any]]) -> Verdict:
    verdict = Verdict()
    bad = verdict.violations
    faults = _Faults(events)
    invokes: dict[str, dict[str, Any]] = {}
    outcomes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    starts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    ends: set[tuple[str, str]] = set()
    ticks: list[float] = []
    for e in events:
        k = e["k"]
        if k == "invoke":
            invokes[e["id"]] = e
        elif k == "outcome":
            outcomes[e["id"]].append(e)
        elif k == "run_start":
            starts[e["token"]].append(e)
        elif k == "run_end":
            ends.add((e["token"], e["nonce"]))
        elif k == "tick":
            ticks.append(e["t"])
    killed_callers = {f["target"]: f["start"] for f in faults.all if f["kind"] == "caller_kill"}
    hung = {c for e in events if e["k"] == "caller_hung" for c in e["callers"]}

    # -- every call: exactly one outcome, on time, the right value or an allowed error
    worst_late = 0.0
    fault_errors: Counter[str] = Counter()
    for cid, inv in invokes.items():
        outs = outcomes.get(cid, [])
        if len(outs) > 1:
            bad.append(f"call {cid} ({inv['method']}) got {len(outs)} outcomes")
            continue
        if not outs:
            killed_at = killed_callers.get(inv["caller"])
            if (killed_at is None or killed_at < inv["t"]) and inv["caller"] not in hung:
                bad.append(f"call {cid} ({inv['method']}) got no outcome")
            elif inv["caller"] in hung:
                bad.append(f"call {cid} ({inv['method']}) got no outcome: its caller hung")
            continue
        out = outs[0]
        deadline = inv["t"] + inv["timeout"] + inv.get("delay", 0.0)
        late = out["t"] - deadline
        if inv["method"] != "numbers":  # a stream's timeout bounds the whole stream, abandoned or not
            worst_late = max(worst_late, late)
            if late > LATE_BOUND:
                bad.append(f"call {cid} ({inv['method']}) answered {late:.2f} s after its deadline")
        expect = inv["expect"]
        window = faults.within(inv["t"], out["t"])
        if out["ok"]:
            if expect not in ("ok",):
                bad.append(f"call {cid} ({inv['method']}) succeeded where {expect} was due")
            elif inv["method"] == "numbers":
                if not out.get("in_order", True):
                    bad.append(f"call {cid} (numbers) items out of order, missing or cut short")
            elif inv["method"] in ("echo", "flaky"):
                value = out.get("value")
                if not (isinstance(value, list) and len(value) == 3 and value[0] == cid):
                    bad.append(f"call {cid} ({inv['method']}) returned {value!r}, not its own value")
                elif (cid, value[1]) not in ends:
                    bad.append(
                        f"call {cid} ({inv['method']}) returned run {value[1]}, which no run of it produced"
                    )
        else:
            error = out["error"]
            if inv["method"] == "numbers" and not out.get("in_order", True):
                bad.append(f"call {cid} (numbers) items out of order or missing before {error}")
            if (expect == "late" and error in ("CallTimeout", "DeadlineExceeded")) or error == expect:
                pass
            elif error in FAULT_ERRORS and window:
                fault_errors[error] += 1
            else:
                kinds = sorted({f["kind"] for f in window}) or "no fault"
                bad.append(f"call {cid} ({inv['method']}) failed with {error} ({out.get('message', '')!r}) "
                           f"with {kinds} in its window")  # fmt: skip

    # -- reruns: each explained by a fault; none after the caller gave up before a worker took it
    reruns = 0
    rerun_faults: Counter[str] = Counter()
    for token, runs in starts.items():
        if token == "tick":
            continue
        inv = invokes.get(token)
        expected = 1
        if inv is not None and inv["method"] == "flaky":
            out = (outcomes.get(token) or [{}])[0]
            expected = int(out.get("fails", 0)) + 1 if out.get("ok") else len(runs)
        extra = len(runs) - expected
        if extra > 0:
            reruns += extra
            first, last = runs[0]["t"], runs[-1]["t"]
            pids = {r["pid"] for r in runs}  # a stalled worker's stale run may come last
            why = [f for f in faults.within(first, last, RERUN_FAULTS) if faults.hit(f, pids)]
            if not why:
                bad.append(f"call {token} ran {len(runs)} times with no fault to explain it")
            else:
                rerun_faults[min(why, key=lambda f: CAUSES.index(f["kind"]))["kind"]] += extra
        out_list = outcomes.get(token)
        if (
            inv is not None
            and out_list
            and not out_list[0]["ok"]
            and out_list[0]["error"] in ("CallTimeout", "NoLiveWorkers")
        ):
            gave_up = out_list[0]["t"]
            if runs[0]["t"] > gave_up + 0.2 and not faults.within(inv["t"], runs[0]["t"], RERUN_FAULTS):
                bad.append(f"call {token} ran {runs[0]['t'] - gave_up:.2f} s after its caller gave up, "
                           "before any worker took it")  # fmt: skip

    # -- one answer per call on the wire: a second reply only after Redis lost an acknowledgement
    replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["k"] == "reply":
            replies[e["call"]].append(e)
    for call_id, read_twice in replies.items():
        # The same entry read twice (the dispatcher reading again after a reconnect) is one answer.
        got = list({r.get("entry", id(r)): r for r in read_twice}.values())
        if len(got) > 1 and not faults.within(got[0]["t"] - RECOVERY, got[-1]["t"], DATA_LOSS):
            token = next((r["token"] for r in got if r.get("token")), None)
            workers = sorted({str(r["worker"]) for r in got})
            bad.append(f"call {token or call_id} answered {len(got)} times on the wire (by {workers}) "
                       "with no Redis data loss to explain it")  # fmt: skip

    # -- jobs: one final state each, read from another process; once ended, always the same
    submits = {e["job"]: e for e in events if e["k"] == "job_submit"}
    finals: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["k"] == "job_final":
            finals[e["job"]].append(e)
        elif e["k"] == "job_seen":
            seen[e["job"]].append(e)
    ended_states = {"done", "failed", "dead", "cancelled"}
    lost = 0
    for job, sub in submits.items():
        fin = finals.get(job, [])
        if len(fin) != 1:
            bad.append(f"job {job} (call {sub['id']}) read back {len(fin)} times at the end, not once")
            continue
        final = fin[0]
        if final["error"] == "JobNotFound" or str(final["state"]).startswith("error:"):
            if faults.within(sub["t"], final["t"], DATA_LOSS):
                lost += 1
            else:
                bad.append(f"job {job} (call {sub['id']}) not found at the end ({final['message']!r}) "
                           "with no Redis data loss to explain it")  # fmt: skip
            continue
        if final["state"] not in ended_states:
            bad.append(f"job {job} (call {sub['id']}) ended as {final['state']!r}, not an ended state")
            continue
        if final["state"] == "done":
            value = final.get("value")
            if not (isinstance(value, list) and len(value) == 3 and value[0] == sub["id"]):
                bad.append(f"job {job} (call {sub['id']}) result {value!r} is not its own")
            elif (sub["id"], value[1]) not in ends:
                bad.append(f"job {job} (call {sub['id']}) result came from no run of it")
        elif not faults.within(sub["t"], final["t"]):
            bad.append(
                f"job {job} (call {sub['id']}) ended {final['state']} ({final['error']}) with no fault"
            )
        ended_at: tuple[float, str] | None = None
        for obs in seen.get(job, []):
            state = obs.get("state")
            if state is None:
                continue
            if ended_at is not None and state != ended_at[1]:
                bad.append(f"job {job} read as {state!r} by {obs['by']} after it was {ended_at[1]!r}")
                break
            if state in ended_states and ended_at is None:
                ended_at = (obs["t"], state)
        if ended_at is not None and ended_at[1] != final["state"]:
            bad.append(f"job {job} was {ended_at[1]!r}, then {final['state']!r} at the end")

    # -- ticks: never twice (Redis counts each tick's runs: its job's attempts), resumed after faults
    tick_jobs = [e for e in events if e["k"] == "tick_job"]
    for tj in tick_jobs:
        if tj["attempts"] > 1 and not faults.within(tj["tick_t"], tj["t"], RERUN_FAULTS):
            bad.append(f"tick {tj['job']} ran {tj['attempts']} times with no fault to explain it")
    counted = sum(tj["attempts"] for tj in tick_jobs)
    # A stale run of a tick that had ended (a stalled worker's) is not counted by design; with no
    # worker fault at all, every run must be.
    if (
        tick_jobs
        and len(ticks) > counted
        and not (faults.all and RERUN_FAULTS & {f["kind"] for f in faults.all})
    ):
        bad.append(f"the schedule ran {len(ticks)} times but its ticks count {counted} runs")
    healed = [e["t"] for e in events if e["k"] == "phase" and e["name"] == "healed"]
    if healed:
        after = [t for t in ticks if healed[0] < t <= healed[0] + TICK_RESUME + RECOVERY]
        if not after:
            bad.append(
                f"the schedule did not tick within {TICK_RESUME + RECOVERY:g} s after the faults healed"
            )

    # -- processes: no worker died but by the nemesis; memory bounded; every fault done
    for e in events:
        if e["k"] == "nemesis_error":
            bad.append(f"the nemesis failed to do {e['fault']}: {e['error']}")
    started_at = {e["worker"]: e["t"] for e in events if e["k"] == "worker_start"}
    refused = 0
    for e in events:
        if e["k"] == "worker_exit" and e["by"] == "itself":
            # Exit 4 (Redis unavailable) is documented for a worker that cannot reach Redis as it
            # starts: allowed for one started while Redis (or its link) was down, or stopped while it
            # connected; the run replaces it.
            began = started_at.get(e["worker"], e["t"])
            redis_down = faults.within(began, e["t"], DATA_LOSS | {"partition"})
            # Or the worker itself stopped (SIGSTOP) as it connected: its connection timed out.
            stalled = [f for f in faults.within(began, e["t"], {"stall"}) if f["target"] == e["worker"]]
            if e["code"] == 4 and e["t"] - began < 30 and (redis_down or stalled):
                refused += 1
                continue
            bad.append(
                f"worker {e['worker']} exited with {e['code']} by itself: {e.get('output', '')[-300:]!r}"
            )
    # The callers: none dies by itself (exit 1, Redis unreachable, is allowed for one started while
    # Redis was down; the run replaces it), and the workload goes on until its time is up.
    spawned = {e["caller"]: e["t"] for e in events if e["k"] == "caller_spawn"}
    callers_refused = 0
    for e in events:
        if e["k"] == "caller_exit":
            began = spawned.get(e["caller"], e["t"])
            redis_down = faults.within(began, e["t"], DATA_LOSS)
            if e["code"] == 1 and e["t"] - began < 30 and redis_down and "RedisUnavailable" in e["output"]:
                callers_refused += 1
                continue
            bad.append(f"caller {e['caller']} exited with {e['code']} by itself: {e['output'][-300:]!r}")
    start = next((e for e in events if e["k"] == "phase" and e.get("name") == "start"), None)
    sent = sorted(inv["t"] for inv in invokes.values())
    if start is not None and "seconds" in start and sent:
        marks = [*sent, start["t"] + start["seconds"]]
        gap, after = max((b - a, a) for a, b in itertools.pairwise(marks))
        if gap > WORKLOAD_GAP:
            bad.append(f"no call was sent for {gap:.0f} s from t={after:.0f}: the workload stopped")

    mem = [e for e in events if e["k"] == "memory"]
    max_rss = max((r for e in mem for r in e["rss"].values()), default=0)
    max_redis = max((e["redis"] for e in mem), default=0)
    if max_rss > RSS_BOUND:
        bad.append(f"a worker's RSS reached {max_rss / 2**20:.0f} MiB (bound {RSS_BOUND / 2**20:.0f} MiB)")
    if max_redis > REDIS_BOUND:
        bad.append(
            f"Redis used_memory reached {max_redis / 2**20:.0f} MiB (bound {REDIS_BOUND / 2**20:.0f} MiB)"
        )

    # A lapse with no fault done to its worker or to Redis at the time: the machine's own doing.
    unprovoked = 0
    for lapse in (f for f in faults.all if f["kind"] == "lapse"):
        pid = faults.pids.get(lapse["target"])
        others = faults.within(lapse["start"], lapse["end"], RERUN_FAULTS - {"lapse"})
        if not [f for f in others if pid is None or faults.hit(f, {pid})]:
            unprovoked += 1

    verdict.stats = {
        "calls": len(invokes),
        "jobs": len(submits),
        "jobs_lost": lost,
        "ticks": len(ticks),
        "tick_jobs": len(tick_jobs),
        "tick_runs_not_counted": max(0, len(ticks) - counted),
        "faults": dict(Counter(f["kind"] for f in faults.all)),
        "reruns": reruns,
        "rerun_faults": dict(rerun_faults),
        "lapses_without_fault": unprovoked,
        "worst_late": round(worst_late, 3),
        "fault_errors": dict(fault_errors),
        "workers_refused_at_start": refused,
        "callers_refused_at_start": callers_refused,
        "max_rss": max_rss,
        "max_redis": max_redis,
    }
    return verdict


def main(folder: str) -> int:
    verdict = check(load(Path(folder)))
    print(verdict.summary())
    print(json.dumps(verdict.stats))
    return 0 if verdict.ok else 1
