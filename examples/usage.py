"""The titan-broker walkthrough: spawn a service, call it, handle errors, inspect, shut down.

Run from the project root: ``python -m examples.usage`` (or ``make demo``).
Uses $TITAN_REDIS_URL when set; otherwise starts a private redis-server
for the length of the demo and stops it afterwards.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack

import anyio
from rich.console import Console
from rich.table import Table

from processes.calculator import Calculator
from titan_broker import CallTimeout, ProcessManager, RemoteError, with_options
from titan_broker.local_redis import LocalRedis
from titan_broker.registry import list_services

console = Console()


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


async def demo(url: str) -> None:
    async with ProcessManager(url, namespace="demo") as pm:
        step("1. Spawn the calculator service from processes/calculator.py")
        started = time.monotonic()
        calc = await pm.spawn("processes/calculator.py", Calculator, dependencies={"precision": 4})
        pid = pm.workers[-1].pid
        console.print(f"worker pid {pid} ready in {time.monotonic() - started:.2f} s")

        step("2. Typed calls: the proxy is a Calculator to mypy, RPC over Redis at run time")
        console.print(f"add(5, 3)        = {await calc.add(5, 3)}")
        console.print(f"divide(10, 3)    = {await calc.divide(10, 3)}   (precision 4, from init())")
        console.print(f"power(2, 16)     = {await calc.power(2, 16)}")
        console.print(f"factorial(25)    = {await calc.factorial(25)}")

        step("3. Remote errors come back as data and are raised as RemoteError")
        try:
            await calc.divide(1, 0)
        except RemoteError as exc:
            console.print(f"divide(1, 0) raised RemoteError(type={exc.type!r}, message={exc.message!r})")

        step("4. 500 concurrent calls through one proxy")
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(calc.multiply, i, 2)
        elapsed = time.monotonic() - started
        console.print(f"500 calls in {elapsed:.2f} s ({500 / elapsed:,.0f} calls/s)")
        console.print(f"get_stats() = {await calc.get_stats()}")

        step("5. Deadlines: a call that cannot finish in time fails, it never hangs")
        ghost = await pm.connect("ghost")
        try:
            await ghost.with_options(timeout=0.5).anything()
        except CallTimeout as exc:
            console.print(f"{type(exc).__name__}: {exc}")
        fast = with_options(calc, timeout=2.0)
        console.print(f"with_options(calc, timeout=2.0).add(1, 1) = {await fast.add(1, 1)}")

        step("6. Discovery: what the registry in Redis knows")
        table = Table("service", "version", "worker", "pid", "status", "calls")
        for service in await list_services(pm.client.redis, pm.client.keys):
            for w in service.workers:
                table.add_row(service.name, service.version, w.worker_id, str(w.pid), w.status, str(w.calls))
        console.print(table)

        step("7. Graceful shutdown: drain, run @on_shutdown, deregister")
        started = time.monotonic()
    console.print(f"all workers stopped in {time.monotonic() - started:.2f} s, exit code 0")


def main() -> None:
    with ExitStack() as stack:
        url = os.environ.get("TITAN_REDIS_URL")
        if not url:
            server = stack.enter_context(LocalRedis())
            url = server.url
            console.print(f"[dim]TITAN_REDIS_URL not set: started a private redis-server on {url}[/]")
        anyio.run(demo, url)


if __name__ == "__main__":
    main()
