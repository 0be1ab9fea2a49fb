"""The titan-broker walkthrough: services, typed calls, pools, health, discovery, metrics, shutdown.

Run from the project root: ``python -m examples.usage``, ``python examples/usage.py`` or ``make demo``.
Uses $TITAN_REDIS_URL when set; otherwise starts a private redis-server
for the length of the demo and stops it afterwards.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import anyio
import psutil
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

if __package__ in (None, ""):  # run as a script (python examples/x.py): the project's root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processes.calculator import Calculator
from processes.database import Database
from processes.image_processor import ImageProcessor
from titan_broker import AutoScale, CallTimeout, ProcessManager, RemoteError, with_options
from titan_broker.testing import LocalRedis

console = Console()


def ms(value: float | None) -> str:
    """A latency in a table: '-' for a worker that has served nothing yet."""
    return "-" if value is None else f"{value:.2f}"


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def sample_png(width: int, height: int, shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 80, 255 - shade)).save(out, format="PNG")
    return out.getvalue()


async def demo(url: str, folder: Path) -> None:
    started_demo = time.monotonic()
    async with ProcessManager(url, namespace="demo") as pm:
        pm.on_event(lambda e: console.print(f"  [dim]event: {e}[/]") if e.kind != "ready" else None)

        step("1. Spawn the calculator service from processes/calculator.py")
        started = time.monotonic()
        calc = await pm.spawn("processes/calculator.py", Calculator, dependencies={"precision": 4})
        console.print(f"worker pid {pm.workers[-1].pid} ready in {time.monotonic() - started:.2f} s")
        console.print(f"add(5, 3)        = {await calc.add(5, 3)}")
        console.print(f"divide(10, 3)    = {await calc.divide(10, 3)}   (precision 4, from init())")
        console.print(f"factorial(25)    = {await calc.factorial(25)}")
        try:
            await calc.divide(1, 0)
        except RemoteError as exc:
            console.print(f"divide(1, 0) raised RemoteError(type={exc.type!r}, message={exc.message!r})")
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(calc.multiply, i, 2)
        elapsed = time.monotonic() - started
        console.print(f"500 concurrent calls in {elapsed:.2f} s ({500 / elapsed:,.0f} calls/s)")

        step("2. Spawn the database with its dependencies (SQLite, @cache, @rate_limit)")
        db = await pm.spawn(
            "processes/database.py", Database, dependencies={"config": {"path": str(folder / "users.db")}}
        )
        ada = await db.create_user("Ada Lovelace", "ada@example.org")
        await db.create_user("Grace Hopper", "grace@navy.mil")
        user = await db.get_user(ada.id)  # a User, to mypy and at run time
        console.print(f"get_user({ada.id}) = {user!r}", soft_wrap=True)
        console.print(
            f"  a {type(user).__name__}; created_at is a {type(user.created_at).__name__}: "
            f"{user.created_at:%Y-%m-%d %H:%M:%S.%f %Z}"
        )
        await db.update_user(ada.id, name="Ada King")
        updated = await db.get_user(ada.id)
        console.print(f"after update_user: {updated.name}   (cache invalidated)")
        console.print(f"search_users('HOPPER') = {[u.name for u in await db.search_users('HOPPER')]}")
        since = [u.name async for u in db.users_since(ada.created_at)]  # a datetime argument, streamed Users
        console.print(f"users_since(ada.created_at) = {since}")
        try:
            await db.create_user("Ada again", "ada@example.org")
        except RemoteError as exc:
            console.print(f"duplicate email: {exc.type}: {exc.message}")

        step("3. A pool of image processors with autoscale, processing jobs concurrently")
        pool = await pm.pool(
            "processes/image_processor.py",
            ImageProcessor,
            autoscale=AutoScale(min=1, max=2, target_cpu=0.5, target_backlog=1, interval=0.5, cooldown=2),
            concurrency=2,
        )
        jobs = [
            {
                "id": i,
                "image": sample_png(1600, 1200, i * 20 % 255),
                "operations": [
                    {"op": "filter", "name": "blur"},
                    {"op": "resize", "width": 300, "height": 200},
                    {"op": "filter", "name": "sharpen"},
                    {"op": "compress", "quality": 70},
                ],
            }
            for i in range(32)
        ]
        with Progress(console=console) as progress:
            task = progress.add_task("processing 32 images", total=len(jobs))

            async def one(job: dict[str, object]) -> None:
                await pool.proxy.process_image(job)
                progress.advance(task)

            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(one, job)
        console.print(f"pool size now {pool.size} (autoscale min 1, max 2)")
        streamed = [r["id"] async for r in pool.proxy.process_batch(jobs[:4])]
        console.print(f"process_batch streamed results as they finished: ids {streamed}")

        step("4. Health, across every worker")
        for service in ("calculator", "database", "image-processor"):
            health = await pm.health(service)
            console.print(
                f"{service:16} {health.status}  ({health.healthy}/{len(health.workers)} workers healthy)"
            )

        step("5. Discovery: what the registry in Redis knows")
        table = Table("service", "version", "workers per host", "methods")
        for info in await pm.services():
            table.add_row(info.name, info.version, str(info.hosts), str(len(info.methods)))
        console.print(table)

        step("6. Every process with its metrics")
        table = Table("service", "pid", "calls", "errors", "p50 ms", "p99 ms", "RSS MiB")
        for info in await pm.services():
            for w in info.workers:
                latency = w.latency.summary()
                rss = psutil.Process(w.pid).memory_info().rss / 2**20
                row = (str(w.pid), str(w.calls), str(w.errors), ms(latency["p50"]), ms(latency["p99"]))
                table.add_row(info.name, *row, f"{rss:.0f}")
        console.print(table)
        metrics = await pool.metrics()
        summary = f"{metrics.workers} workers, {metrics.calls} calls, p95 {ms(metrics.p95_ms)} ms"
        console.print(f"image pool: {summary}, {metrics.rss / 2**20:.0f} MiB resident")

        step("7. Deadlines: a call that cannot finish in time fails, it never hangs")
        ghost = await pm.connect("ghost")
        try:
            await ghost.with_options(timeout=0.5).anything()
        except CallTimeout as exc:
            console.print(f"{type(exc).__name__}: {exc}")
        console.print(
            f"with_options(calc, timeout=2.0).add(1, 1) = {await with_options(calc, timeout=2.0).add(1, 1)}"
        )

        step("8. Graceful shutdown: drain, run @on_shutdown, deregister")
        started = time.monotonic()
    console.print(f"all workers stopped in {time.monotonic() - started:.2f} s, exit code 0")
    console.print(f"[bold green]demo finished in {time.monotonic() - started_demo:.1f} s")


def main() -> None:
    with ExitStack() as stack:
        url = os.environ.get("TITAN_REDIS_URL")
        if not url:
            server = stack.enter_context(LocalRedis())
            url = server.url
            console.print(f"[dim]TITAN_REDIS_URL not set: started a private redis-server on {url}[/]")
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="titan-demo-")))
        anyio.run(demo, url, folder)


if __name__ == "__main__":
    main()
