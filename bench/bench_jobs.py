"""Background jobs: submit throughput, and how late delayed jobs start under load.

- Submit: 64 submits in flight from one process (each returns once the job is queued, not
  done), 2 calculator workers serving them; submits/s per round, and jobs/s end to end (until
  the workers finished every job submitted). Plain calls (bench_core's B loop) run in the same
  rounds for comparison.
- Delay: while that load runs, jobs delayed 1 s are submitted every 20 ms for ``--seconds``,
  and the load goes on until they all came due; each one's lateness is its start (the
  worker's mark) minus its due time, both in Redis's clock.

One private redis-server. Run: `python -m bench.bench_jobs [--seconds 3] [--rounds 4]`.
"""

from __future__ import annotations

import argparse
import time

import anyio

from bench.bench_core import IN_FLIGHT, percentile, throughput
from processes.calculator import Calculator
from titan_broker import BacklogFull, ProcessManager
from titan_broker._calling.jobs import JobState
from titan_broker.testing._local_redis import LocalRedis

DELAY = 1.0


async def load(pm: ProcessManager, calc: Calculator, stop: anyio.Event) -> tuple[float, float]:
    """Submit jobs, IN_FLIGHT at a time, until ``stop``; then (submits/s, jobs/s end to end)."""
    ids: list[str] = []

    async def submitter() -> None:
        while not stop.is_set():
            try:
                ids.append((await pm.submit(calc.add, len(ids), 1)).id)
            except BacklogFull:  # the workers fell max_backlog behind: back off, as a producer would
                await anyio.sleep(0.05)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(IN_FLIGHT):
            tg.start_soon(submitter)
    submitted = time.perf_counter() - started
    for job_id in ids[-1:] + ids[:: max(1, len(ids) // 50)]:  # the last, and a sample: all end
        await pm.job(job_id).result(timeout=120)
    return len(ids) / submitted, len(ids) / (time.perf_counter() - started)


async def lateness(pm: ProcessManager, seconds: float, stop: anyio.Event) -> list[tuple[float, float]]:
    """Submit a job delayed DELAY every 20 ms for ``seconds``, let them come due (the load goes
    on meanwhile), then set ``stop``; return how late each reached the stream and started (s)."""
    ids: list[str] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        ids.append(await pm.client.submit("calculator", "add", (1, 2), delay=DELAY))
        await anyio.sleep(0.02)
    await anyio.sleep(DELAY + 0.5)
    stop.set()
    late: list[tuple[float, float]] = []
    for job_id in ids:
        job = pm.job(job_id)
        await job.result(timeout=120)
        status = await job.status()
        assert status.state is JobState.DONE and status.started and status.due and status.queued
        late.append(
            ((status.queued - status.due).total_seconds(), (status.started - status.due).total_seconds())
        )
    return late


async def run(url: str, seconds: float, rounds: int) -> None:
    async with ProcessManager(url, namespace="bench-jobs", default_timeout=60) as pm:
        calc = await pm.spawn("processes/calculator.py", Calculator)
        await pm.spawn("processes/calculator.py", Calculator)
        warm = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, pm, calc, warm)
            await anyio.sleep(0.5)
            warm.set()
        submit_rates, done_rates, call_rates = [], [], []
        late: list[tuple[float, float]] = []
        for _ in range(rounds):
            stop = anyio.Event()
            rates: list[tuple[float, float]] = []
            async with anyio.create_task_group() as tg:

                async def measured(stop: anyio.Event = stop, out: list[tuple[float, float]] = rates) -> None:
                    out.append(await load(pm, calc, stop))

                tg.start_soon(measured)
                late.extend(await lateness(pm, seconds, stop))
            submit_rates.append(rates[0][0])
            done_rates.append(rates[0][1])
            call_rates.append(await throughput([lambda i: calc.add(i, 1)] * IN_FLIGHT, int(rates[0][0] * 2)))
    median = rounds // 2
    print(f"{'per round':<12}{'submits/s':>12}{'jobs/s done':>14}{'calls/s':>10}")
    for r, (s, d, c) in enumerate(zip(submit_rates, done_rates, call_rates, strict=True), 1):
        print(f"{'round ' + str(r):<12}{s:>12,.0f}{d:>14,.0f}{c:>10,.0f}")
    print(f"{'median':<12}{sorted(submit_rates)[median]:>12,.0f}{sorted(done_rates)[median]:>14,.0f}"
          f"{sorted(call_rates)[median]:>10,.0f}")  # fmt: skip
    print(f"{len(late)} jobs delayed {DELAY:g} s, due under that load, late by (ms):")
    for label, samples in (("on the stream", [q for q, _ in late]), ("started", [s for _, s in late])):
        p50, p99 = percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000
        top, low = max(samples) * 1000, min(samples) * 1000
        print(f"  {label:<14} p50 {p50:5.0f}  p99 {p99:5.0f}  max {top:5.0f}  min {low:5.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of delayed submits a round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with LocalRedis() as server:
        anyio.run(run, server.url, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
