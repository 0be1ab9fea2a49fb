"""``titan``: inspect services and call them from the shell.

Exit codes (also in README.md):
  0  success
  1  the call failed (remote error, timeout, no live worker, backlog full); for
     `health`, a service is not healthy
  2  bad command line
  3  unknown service
  4  Redis unreachable or refused the credentials
"""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Any

import anyio
import typer
from rich.live import Live
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from titan_broker._calling import Client
from titan_broker._registry import (
    LatencyHistogram,
    QueueInfo,
    ServiceHealth,
    VersionInfo,
    WorkerInfo,
    aggregate,
    known_services,
    list_dead_letters,
    list_services,
    list_workers,
    purge_dead_letters,
    queue_info,
    replay_dead_letters,
)
from titan_broker._service import HealthStatus

from .common import (
    EXIT_CALL_FAILED,
    EXIT_USAGE,
    UnknownService,
    err,
    out,
    print_json,
    run,
)
from .common import (
    app as app,
)


@app.command()
def services(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the services that have at least one live worker, each version serving with its workers."""
    found = run(ctx, lambda c: list_services(c.redis, c.keys))
    if as_json:
        print_json([s.to_dict() for s in found])
        return
    if not found:
        out.print("no live services (start one with: titan-worker run FILE)")
        return
    table = Table(title="services")
    for col in ("service", "version", "workers", "in flight", "calls", "methods"):
        table.add_column(col)
    for s in found:
        # One row per version serving (several during a rolling upgrade), each with its own methods.
        versions = s.versions or [VersionInfo(s.version, s.methods, s.workers)]
        for i, v in enumerate(versions):
            table.add_row(
                s.name if i == 0 else "",
                v.version,
                str(len(v.workers)),
                str(sum(w.in_flight for w in v.workers)),
                str(sum(w.calls for w in v.workers)),
                "\n".join(_method_line(m) for m in v.methods),
            )
    out.print(table)


@app.command("dead-letters")
def dead_letters(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="Service name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    replay: Annotated[bool, typer.Option("--replay", help="Put them back on the service's stream.")] = False,
    purge: Annotated[bool, typer.Option("--purge", help="Delete them.")] = False,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Only this dead letter (repeatable).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds a replayed call may take.")] = 60.0,
) -> None:
    """List a service's dead letters, or --replay / --purge them."""
    if replay and purge:
        err.print("[red]error:[/] choose one of --replay and --purge", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    if replay or purge:

        async def act(c: Client) -> int:
            if replay:
                with Progress(console=err, transient=True, disable=as_json) as bar:
                    task = bar.add_task(f"replaying dead letters of {service}", total=None)
                    return await replay_dead_letters(
                        c.redis, c.keys, service, ids, timeout=timeout,
                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                    )  # fmt: skip
            return await purge_dead_letters(c.redis, c.keys, service, ids)

        count = run(ctx, act)
        if as_json:
            print_json({"replayed" if replay else "purged": count})
        else:
            out.print(
                f"{'replayed' if replay else 'purged'} {count} dead letter(s) of {escape(repr(service))}"
            )
        return
    letters = run(ctx, lambda c: list_dead_letters(c.redis, c.keys, service, count=1000))
    if as_json:
        print_json([d.to_dict() for d in letters])
        return
    if not letters:
        out.print(f"no dead letters for {escape(repr(service))}")
        return
    table = Table(title=f"dead letters of {service}")
    for col in ("id", "method", "deliveries", "reason"):
        table.add_column(col)
    for d in letters:
        table.add_row(d.id, escape(d.method or "?"), str(d.deliveries), escape(d.reason))
    out.print(table)


async def _services_named(client: Client, service: str | None) -> list[str]:
    """``[service]`` after checking it exists, or every known service."""
    known = await known_services(client.redis, client.keys)
    if service is None:
        return known
    if service not in known:
        hint = f"known: {', '.join(known)}" if known else "no service has registered yet"
        raise UnknownService(
            f"unknown service {service!r} in namespace {client.namespace!r} ({hint}); "
            "check --namespace, or start it with titan-worker run FILE"
        )
    return [service]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@app.command()
def workers(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Argument(help="Only this service.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List live workers: host, pid, status, load and health."""

    async def gather(c: Client) -> list[WorkerInfo]:
        found: list[WorkerInfo] = []
        for name in await _services_named(c, service):
            found += await list_workers(c.redis, c.keys, name)
        return found

    found = run(ctx, gather)
    if as_json:
        print_json([w.to_dict() for w in found])
        return
    table = Table(title="workers")
    for col in ("service", "worker", "host", "pid", "status", "in flight", "calls", "errors", "health"):
        table.add_column(col)
    for w in found:
        status = (w.health or {}).get("status", "-")
        table.add_row(w.service, w.worker_id, w.host, str(w.pid), w.status, f"{w.in_flight}/{w.concurrency}",
                      str(w.calls), str(w.errors), status)  # fmt: skip
    out.print(table if found else "no live workers")


@app.command()
def health(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Argument(help="Only this service.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Health of each service across all its workers; exits 1 unless all are healthy."""

    async def gather(c: Client) -> list[ServiceHealth]:
        names = await _services_named(c, service)
        return [aggregate(name, await list_workers(c.redis, c.keys, name)) for name in names]

    found = run(ctx, gather)
    if as_json:
        print_json([h.to_dict() for h in found])
    else:
        colors = {"healthy": "green", "degraded": "yellow", "unhealthy": "red"}
        table = Table(title="health")
        for col in ("service", "status", "healthy workers", "details"):
            table.add_column(col)
        for h in found:
            notes = "; ".join(
                f"{w['worker_id']}: {w['status']} {w['details'] or ''}".strip()
                for w in h.workers
                if w["status"] != "healthy"
            )
            status = f"[{colors[str(h.status)]}]{h.status}[/]"
            table.add_row(h.service, status, f"{h.healthy}/{len(h.workers)}", escape(notes))
        out.print(table)
    if any(h.status != HealthStatus.HEALTHY for h in found):
        raise typer.Exit(EXIT_CALL_FAILED)


@app.command()
def queues(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Calls waiting, running and dead-lettered, per service."""

    async def gather(c: Client) -> list[QueueInfo]:
        return [await queue_info(c.redis, c.keys, name) for name in await known_services(c.redis, c.keys)]

    found = run(ctx, gather)
    if as_json:
        print_json([q.to_dict() for q in found])
        return
    table = Table(title="queues")
    for col in ("service", "waiting", "running", "dead letters"):
        table.add_column(col)
    for q in found:
        table.add_row(q.service, str(q.waiting), str(q.pending), str(q.dead_letters))
    out.print(table if found else "no services")


async def _stats(c: Client, names: list[str], interval: float) -> list[dict[str, Any]]:
    before = {n: sum(w.calls for w in await list_workers(c.redis, c.keys, n)) for n in names}
    await anyio.sleep(interval)
    rows = []
    for name in names:
        live = await list_workers(c.redis, c.keys, name)
        calls = sum(w.calls for w in live)
        latency = LatencyHistogram.merged(w.latency for w in live).summary()
        rows.append({
            "service": name,
            "workers": len(live),
            "calls": calls,
            "errors": sum(w.errors for w in live),
            "throughput": round(max(0, calls - before[name]) / interval, 2),
            **{f"{k}_ms": v for k, v in latency.items()},
        })  # fmt: skip
    return rows


def _stats_table(rows: list[dict[str, Any]], title: str = "stats") -> Table:
    table = Table(title=title)
    for col in ("service", "workers", "calls", "errors", "calls/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "service" else "right")
    for r in rows:
        counts = (str(r["workers"]), str(r["calls"]), str(r["errors"]), f"{r['throughput']:.1f}")
        table.add_row(r["service"], *counts, _ms(r["p50_ms"]), _ms(r["p95_ms"]), _ms(r["p99_ms"]))
    return table


@app.command()
def stats(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Argument(help="Only this service.")] = None,
    interval: Annotated[float, typer.Option(help="Seconds over which throughput is measured.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Calls, errors, throughput and latency percentiles per service (all workers merged)."""

    async def gather(c: Client) -> list[dict[str, Any]]:
        return await _stats(c, await _services_named(c, service), interval)

    rows = run(ctx, gather)
    if as_json:
        print_json(rows)
    else:
        out.print(_stats_table(rows) if rows else "no services")


@app.command()
def top(
    ctx: typer.Context,
    refresh: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    count: Annotated[
        int | None, typer.Option(help="Stop after this many refreshes (default: Ctrl-C).")
    ] = None,
) -> None:
    """A live view of services, workers per host, load, latency and health, until Ctrl-C."""

    async def view(c: Client) -> None:
        with Live(console=out, auto_refresh=False) as live:
            shown = 0
            while count is None or shown < count:
                names = await known_services(c.redis, c.keys)
                rows = await _stats(c, names, refresh)
                grid = Table.grid()
                grid.add_row(_stats_table(rows, title=f"titan top: {c.namespace} (every {refresh:g} s)"))
                table = Table(title="workers by host")
                for col in ("service", "host", "workers", "in flight", "health"):
                    table.add_column(col)
                for name in names:
                    live_workers = await list_workers(c.redis, c.keys, name)
                    hosts: dict[str, list[WorkerInfo]] = {}
                    for w in live_workers:
                        hosts.setdefault(w.host, []).append(w)
                    status = str(aggregate(name, live_workers).status)
                    for host, ws in hosts.items():
                        table.add_row(name, host, str(len(ws)), str(sum(w.in_flight for w in ws)), status)
                grid.add_row(table)
                live.update(grid, refresh=True)
                shown += 1

    with contextlib.suppress(KeyboardInterrupt):
        run(ctx, view)


def _method_line(method: dict[str, Any]) -> str:
    """``get_user(uid: int) -> dict  [cache ttl=60, metric]`` for the services table."""
    line = str(method.get("signature", method.get("name", "?")))
    decorators = method.get("decorators") or {}
    if method.get("streaming"):
        line += "  (streams)"
    if decorators:
        parts = []
        for name, options in decorators.items():
            shown = " ".join(f"{k}={v}" for k, v in options.items() if k in ("ttl", "scope", "rps", "name"))
            parts.append(f"{name} {shown}".strip())
        line += f"  [{', '.join(parts)}]"
    return escape(line)  # '[' in type hints and options is text, not rich markup


def _parse_arg(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


@app.command()
def call(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="Service name.")],
    method: Annotated[str, typer.Argument(help="Public method name.")],
    args: Annotated[
        list[str] | None,
        typer.Argument(help="Arguments, each parsed as JSON, else taken as a string."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 30.0,
) -> None:
    """Call SERVICE.METHOD(ARGS...) and print the result as JSON."""
    values = tuple(_parse_arg(a) for a in args or [])

    async def call_it(c: Client) -> Any:
        await _services_named(c, service)  # an unknown service is exit 3 at once, not a timeout
        return await c.call(service, method, values, timeout=timeout)

    print_json(run(ctx, call_it))


from . import codegen as codegen  # noqa: E402  (registers titan codegen on the app)
from . import dashboard as dashboard  # noqa: E402  (registers titan dashboard on the app)
from . import jobs as jobs  # noqa: E402  (registers titan jobs, job and schedules on the app)
