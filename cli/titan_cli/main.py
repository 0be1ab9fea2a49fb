"""``titan``: inspect services and call them from the shell.

Exit codes (also in README.md and docs/cli.md):
  0  success
  1  the call failed (remote error, timeout, no live worker, backlog full); for
     `health`, a service is not healthy
  2  bad command line
  3  unknown service (or, for `health`, a namespace where none has registered)
  4  Redis unreachable or refused the credentials
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Annotated, Any

import anyio
import typer
from rich.live import Live
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from titan_broker._calling import Client
from titan_broker._errors import NoLiveWorkers
from titan_broker._registry import (
    RETIRED_AFTER,
    LatencyHistogram,
    QueueInfo,
    ServiceHealth,
    ServiceInfo,
    VersionInfo,
    WorkerInfo,
    aggregate,
    idle_since,
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
    CallArguments,
    Command,
    JsonOption,
    MethodArgument,
    NamespaceOption,
    RedisOption,
    ServiceArgument,
    UnknownService,
    confirm,
    err,
    iso,
    ms,
    out,
    parse_arguments,
    print_json,
    print_json_line,
    run,
    services_named,
)
from .common import (
    app as app,
)


def _service_row(s: ServiceInfo) -> dict[str, Any]:
    """``services --json``: the table's columns per serving version, each version's methods once."""
    versions = s.versions or [VersionInfo(s.version, s.methods, s.workers)]
    return {
        "service": s.name,
        "description": s.description,
        "shards": s.shards,
        "versions": [
            {
                "version": v.version,
                "workers": [w.worker_id for w in v.workers],
                "in_flight": sum(w.in_flight for w in v.workers),
                "calls": sum(w.calls for w in v.workers),
                "methods": v.methods,
            }
            for v in versions
        ],
        "hosts": s.hosts,
    }


@app.command(cls=Command)
def services(
    ctx: typer.Context,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List the services that have at least one live worker, each version serving with its workers."""
    found = run(ctx, lambda c: list_services(c.redis, c.keys), redis, namespace)
    if as_json:
        print_json([_service_row(s) for s in found])
        return
    if not found:
        out.print("no live services (start one with: titan-worker run FILE)")
        return
    table = Table(title="services")
    for col in ("service", "version", "workers", "in flight", "calls", "methods"):
        table.add_column(col)
    for s in found:
        # One row per version serving (several during a rolling upgrade), each with its own methods.
        for i, v in enumerate(_service_row(s)["versions"]):
            table.add_row(
                (s.name + (f" ({s.shards} shards)" if s.shards > 1 else "")) if i == 0 else "",
                v["version"],
                str(len(v["workers"])),
                str(v["in_flight"]),
                str(v["calls"]),
                "\n".join(_method_line(m) for m in v["methods"]),
            )
    out.print(table)


@app.command("dead-letters", cls=Command)
def dead_letters(
    ctx: typer.Context,
    service: ServiceArgument,
    as_json: JsonOption = False,
    replay: Annotated[bool, typer.Option("--replay", help="Put them back on the service's stream.")] = False,
    purge: Annotated[bool, typer.Option("--purge", help="Delete them (asks first; --yes does not).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before --purge.")] = False,
    ids: Annotated[
        list[str] | None, typer.Option("--id", metavar="ID", help="Only this dead letter (repeatable).")
    ] = None,
    timeout: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds a replayed call may take.")
    ] = 60.0,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List a service's dead letters, or --replay / --purge them."""
    if replay and purge:
        err.print("[red]error:[/] choose one of --replay and --purge", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    if purge:
        which = f"{len(ids)} dead letter(s)" if ids else "every dead letter"
        confirm(f"delete {which} of {service!r}?", yes)
    if replay or purge:

        async def act(c: Client) -> int:
            await services_named(c, service)
            if replay:
                with Progress(console=err, transient=True, disable=as_json) as bar:
                    task = bar.add_task(f"replaying dead letters of {service}", total=None)
                    return await replay_dead_letters(
                        c.redis, c.keys, service, ids, timeout=timeout,
                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                    )  # fmt: skip
            return await purge_dead_letters(c.redis, c.keys, service, ids)

        count = run(ctx, act, redis, namespace, role="operator")
        if as_json:
            print_json({"replayed" if replay else "purged": count})
        else:
            out.print(
                f"{'replayed' if replay else 'purged'} {count} dead letter(s) of {escape(repr(service))}"
            )
        return

    async def read(c: Client) -> list[dict[str, Any]]:
        await services_named(c, service)
        letters = await list_dead_letters(c.redis, c.keys, service, count=1000)
        return [{**d.to_dict(), "at": iso(d.at)} for d in letters]

    letters = run(ctx, read, redis, namespace)
    if as_json:
        print_json(letters)
        return
    if not letters:
        out.print(f"no dead letters for {escape(repr(service))}")
        return
    table = Table(title=f"dead letters of {service}")
    for col in ("id", "method", "deliveries", "at", "reason"):
        table.add_column(col)
    for d in letters:
        at = d["at"][:19].replace("T", " ") if d["at"] else "-"
        table.add_row(d["id"], escape(d["method"] or "?"), str(d["deliveries"]), at, escape(d["reason"]))
    out.print(table)


_services_named = services_named  # the older name


def _worker_row(w: WorkerInfo) -> dict[str, Any]:
    """``workers --json``: the record, times in ISO 8601, health's own time too."""
    row = w.to_dict()
    row["started_at"] = iso(w.started_at)
    row["heartbeat_at"] = iso(w.heartbeat_at)
    if w.health is not None and isinstance(w.health.get("at"), int | float):
        row["health"] = {**w.health, "at": iso(w.health["at"])}
    return row


@app.command(cls=Command)
def workers(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Argument(metavar="[SERVICE]", help="Only this service.")] = None,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List live workers: host, pid, status, load, latency and health."""

    async def gather(c: Client) -> list[WorkerInfo]:
        found: list[WorkerInfo] = []
        for name in await services_named(c, service):
            found += await list_workers(c.redis, c.keys, name)
        return found

    found = run(ctx, gather, redis, namespace)
    if as_json:
        print_json([_worker_row(w) for w in found])
        return
    table = Table(title="workers")
    columns = ("service", "worker id", "host", "pid", "status", "in flight", "calls", "errors", "p50 ms",
               "p99 ms", "health")  # fmt: skip
    for col in columns:
        table.add_column(col)
    for w in found:
        status = (w.health or {}).get("status", "-")
        latency = w.latency.summary()
        load = f"{w.in_flight}/{w.concurrency}"
        table.add_row(w.service, w.worker_id, w.host, str(w.pid), w.status, load, str(w.calls),
                      str(w.errors), ms(latency["p50"]), ms(latency["p99"]), status)  # fmt: skip
    out.print(table if found else "no live workers")


RETIRED = "retired"


@app.command(cls=Command)
def health(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Argument(metavar="[SERVICE]", help="Only this service.")] = None,
    retired_after: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="A service with no live worker for longer is retired: listed apart, not counted.",
        ),
    ] = RETIRED_AFTER,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Health of each service across all its workers; exits 1 unless all are healthy.

    A service whose workers are all gone is unhealthy for --retired-after seconds (an hour),
    then retired: listed apart and left out of the exit code (forget it with titan forget).
    SERVICE named, it must be healthy. A namespace where no service has registered exits 3."""

    async def gather(c: Client) -> tuple[list[ServiceHealth], list[dict[str, Any]]]:
        names = await services_named(c, service)
        if not names:
            raise UnknownService(
                f"no service has registered in namespace {c.namespace!r}: check --namespace and "
                "--redis (a health check pointed at the wrong place must not pass)"
            )
        live: list[ServiceHealth] = []
        retired: list[dict[str, Any]] = []
        for name in names:
            found = await list_workers(c.redis, c.keys, name)
            if not found:
                since, now = await idle_since(c.redis, c.keys, name)
                if now - since >= retired_after:
                    retired.append({"service": name, "status": RETIRED, "no_worker_since": iso(since)})
                    continue
            live.append(aggregate(name, found))
        return live, retired

    found, retired = run(ctx, gather, redis, namespace)
    if as_json:
        rows = [_health_row(h) for h in found]
        print_json(rows + retired)
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
            if not h.workers:
                notes = "no live worker"
            status = f"[{colors[str(h.status)]}]{h.status}[/]"
            table.add_row(h.service, status, f"{h.healthy}/{len(h.workers)}", escape(notes))
        if found:
            out.print(table)
        if retired:
            listed = ", ".join(f"{r['service']} (since {_stamp(r['no_worker_since'])})" for r in retired)
            out.print(f"retired (no live worker for over {retired_after:g} s, not counted): {escape(listed)}")
    if any(h.status != HealthStatus.HEALTHY for h in found) or (service is not None and retired):
        raise typer.Exit(EXIT_CALL_FAILED)


def _stamp(stamp: str | None) -> str:
    return "-" if stamp is None else stamp[:19].replace("T", " ")


def _health_row(h: ServiceHealth) -> dict[str, Any]:
    """``health --json``: the table's columns (healthy_workers of workers), each worker's report."""
    workers = [{**w, "status": str(w["status"])} for w in h.workers]
    return {
        "service": h.service,
        "status": str(h.status),
        "healthy_workers": h.healthy,
        "workers": workers,
        "failed": h.failed,
    }


def _queue_row(q: QueueInfo) -> dict[str, Any]:
    row: dict[str, Any] = {
        "service": q.service, "waiting": q.waiting, "running": q.pending, "dead_letters": q.dead_letters
    }  # fmt: skip
    if q.shards:  # a sharded service: the totals first, then each shard's
        row["shards"] = [_queue_row(shard) for shard in q.shards]
    return row


@app.command(cls=Command)
def queues(
    ctx: typer.Context,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Calls waiting, running and dead-lettered, per service."""

    async def gather(c: Client) -> list[QueueInfo]:
        return [await queue_info(c.redis, c.keys, name) for name in await known_services(c.redis, c.keys)]

    found = [_queue_row(q) for q in run(ctx, gather, redis, namespace)]
    if as_json:
        print_json(found)
        return
    table = Table(title="queues")
    for col in ("service", "waiting", "running", "dead letters"):
        table.add_column(col)
    for q in found:
        table.add_row(q["service"], str(q["waiting"]), str(q["running"]), str(q["dead_letters"]))
        for shard in q.get("shards", []):
            table.add_row(f"  {shard['service']}", str(shard["waiting"]), str(shard["running"]),
                          str(shard["dead_letters"]), style="dim")  # fmt: skip
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
            "calls_per_s": round(max(0, calls - before[name]) / interval, 2),
            **{f"{k}_ms": v for k, v in latency.items()},
        })  # fmt: skip
    return rows


def _stats_table(rows: list[dict[str, Any]], title: str = "stats") -> Table:
    queues = any("waiting" in r for r in rows)
    table = Table(title=title)
    columns = ["service", "workers", "calls", "errors", "calls/s", "p50 ms", "p95 ms", "p99 ms"]
    columns += ["waiting", "running", "dead letters"] if queues else []
    for col in columns:
        table.add_column(col, justify="left" if col == "service" else "right")
    for r in rows:
        counts = (str(r["workers"]), str(r["calls"]), str(r["errors"]), f"{r['calls_per_s']:.1f}")
        backlog = (str(r["waiting"]), str(r["running"]), str(r["dead_letters"])) if queues else ()
        table.add_row(r["service"], *counts, ms(r["p50_ms"]), ms(r["p95_ms"]), ms(r["p99_ms"]), *backlog)
    return table


@app.command(cls=Command)
def stats(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Argument(metavar="[SERVICE]", help="Only this service.")] = None,
    interval: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds over which calls/s is measured.")
    ] = 1.0,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Calls, errors, calls/s and latency percentiles per service (all workers merged)."""

    async def gather(c: Client) -> list[dict[str, Any]]:
        return await _stats(c, await services_named(c, service), interval)

    rows = run(ctx, gather, redis, namespace)
    if as_json:
        print_json(rows)
    else:
        out.print(_stats_table(rows) if rows else "no services")


async def _top_view(c: Client, refresh: float) -> dict[str, Any]:
    """One refresh of ``top``: per service its stats and queues, and its workers per host."""
    names = await known_services(c.redis, c.keys)
    rows = await _stats(c, names, refresh)
    hosts: list[dict[str, Any]] = []
    for row in rows:
        row.update({k: v for k, v in _queue_row(await queue_info(c.redis, c.keys, row["service"])).items()})
        live_workers = await list_workers(c.redis, c.keys, row["service"])
        by_host: dict[str, list[WorkerInfo]] = {}
        for w in live_workers:
            by_host.setdefault(w.host, []).append(w)
        status = str(aggregate(row["service"], live_workers).status)
        row["health"] = status
        for host, ws in by_host.items():
            hosts.append({"service": row["service"], "host": host, "workers": len(ws),
                          "in_flight": sum(w.in_flight for w in ws), "health": status})  # fmt: skip
    return {"namespace": c.namespace, "at": iso(time.time()), "services": rows, "hosts": hosts}


@app.command(cls=Command)
def top(
    ctx: typer.Context,
    refresh: Annotated[float, typer.Option(metavar="SECONDS", help="Seconds between refreshes.")] = 1.0,
    count: Annotated[
        int | None, typer.Option(metavar="N", help="Stop after this many refreshes (default: Ctrl-C).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document per refresh, one per line.")
    ] = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """A live view of services (load, latency, backlog, dead letters), workers per host and health."""

    async def view(c: Client) -> None:
        shown = 0
        if as_json:
            while count is None or shown < count:
                print_json_line(await _top_view(c, refresh))
                shown += 1
            return
        with Live(console=out, auto_refresh=False) as live:
            while count is None or shown < count:
                data = await _top_view(c, refresh)
                grid = Table.grid()
                title = f"titan top: {c.namespace} (every {refresh:g} s)"
                grid.add_row(_stats_table(data["services"], title=title))
                table = Table(title="workers by host")
                for col in ("service", "host", "workers", "in flight", "health"):
                    table.add_column(col)
                for h in data["hosts"]:
                    counts = (str(h["workers"]), str(h["in_flight"]))
                    table.add_row(h["service"], h["host"], *counts, h["health"])
                grid.add_row(table)
                live.update(grid, refresh=True)
                shown += 1

    with contextlib.suppress(KeyboardInterrupt):
        run(ctx, view, redis, namespace)


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


def _print_item(item: Any, as_json: bool) -> None:
    if as_json or not isinstance(item, str):
        print_json_line(item)
    else:
        sys.stdout.write(item + "\n")
        sys.stdout.flush()


class NoWorker(NoLiveWorkers):
    """``titan call`` to a known service with no live worker (refused at once, not queued)."""


@app.command(cls=Command)
def call(
    ctx: typer.Context,
    service: ServiceArgument,
    method: MethodArgument,
    args: CallArguments = None,
    timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Seconds to wait for the answer.")] = 30.0,
    wait: Annotated[
        bool, typer.Option("--wait", help="With no live worker, queue the call for one (until the timeout).")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="JSON always: the result, or a streaming method's items as JSON lines."),
    ] = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Call SERVICE.METHOD(ARGS...) and print the result as JSON; a streaming method's items as they come."""
    values, kwargs = parse_arguments(args or [])

    async def call_it(c: Client) -> tuple[bool, Any]:
        await services_named(c, service)  # an unknown service is exit 3 at once, not a timeout
        if not wait and await c.live_workers(service) == 0:
            raise NoWorker(
                f"service {service!r} has no live worker in namespace {c.namespace!r}: the call was not "
                "sent (start one with titan-worker run FILE, or pass --wait to queue it for one)"
            )
        if method in await c.streaming_methods(service):
            async for item in c.stream(service, method, values, kwargs, timeout=timeout):
                _print_item(item, as_json)
            return True, None
        return False, await c.call(service, method, values, kwargs, timeout=timeout)

    streamed, result = run(ctx, call_it, redis, namespace, role="caller")
    if not streamed:
        print_json(result)


from . import acl as acl  # noqa: E402  (registers titan acl on the app)
from . import actions as actions  # noqa: E402  (registers titan submit, cancel, purge and forget)
from . import codegen as codegen  # noqa: E402  (registers titan codegen on the app)
from . import dashboard as dashboard  # noqa: E402  (registers titan dashboard on the app)
from . import jobs as jobs  # noqa: E402  (registers titan jobs, job and schedules on the app)
