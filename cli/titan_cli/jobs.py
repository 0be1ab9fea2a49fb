"""``titan jobs``, ``titan job`` and ``titan schedules``: background jobs and periodic methods."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from titan_broker._calling import Client, Job, JobState, JobStatus, list_jobs
from titan_broker._errors import ConfigError, JobNotFound
from titan_broker._redis import text
from titan_broker._registry import list_services

from .common import (
    EXIT_CALL_FAILED,
    Command,
    JsonOption,
    NamespaceOption,
    RedisOption,
    app,
    iso,
    out,
    print_json,
    run,
    services_named,
    shown_time,
)


def job_row(status: JobStatus) -> dict[str, Any]:
    """A job in JSON: the table's columns, times in ISO 8601 (UTC, milliseconds), the error as
    ``{type, message}``."""
    return {
        **status.to_dict(),
        **{
            name: iso(when)
            for name, when in (
                ("submitted", status.submitted),
                ("due", status.due),
                ("queued", status.queued),
                ("started", status.started),
                ("finished", status.finished),
            )
        },
    }


def _error_line(status: JobStatus) -> str:
    return f"{status.error.type}: {status.error.message}" if status.error else ""


@app.command("jobs", cls=Command)
def jobs_command(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="The service whose jobs to list.")],
    status: Annotated[
        JobState | None,
        typer.Option("--status", metavar="STATE", help="Only jobs in this state.", case_sensitive=False),
    ] = None,
    count: Annotated[int, typer.Option("--count", metavar="N", help="At most this many, newest first.")] = 50,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List a service's latest jobs (submitted, periodic runs), newest first; times in UTC."""

    async def read(c: Client) -> list[JobStatus]:
        await services_named(c, service)
        return await list_jobs(c.redis, c.keys, service, state=status, count=count)

    found = run(ctx, read, redis, namespace)
    if as_json:
        print_json([job_row(job) for job in found])
        return
    table = Table("id", "method", "state", "attempts", "submitted", "due", "finished", "error")
    for job in found:
        due = shown_time(job.due) if job.state in (JobState.QUEUED, JobState.RETRYING) else "-"
        table.add_row(
            escape(job.id), job.method, str(job.state), str(job.attempts), shown_time(job.submitted),
            due, shown_time(job.finished), escape(_error_line(job)[:60]),
        )  # fmt: skip
    out.print(table if found else f"no jobs of {service!r}" + (f" {status}" if status else ""))


@app.command("job", cls=Command)
def job_command(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id, as submit returned it.")],
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Show one job: where it stands, and its result or error once it ended; times in UTC."""

    async def read(client: Client) -> tuple[JobStatus, Any]:
        job: Job[Any] = client.job(job_id)  # a malformed id: ConfigError, a usage error
        await services_named(client, job.service)  # an unknown service: exit 3, as everywhere
        status = await job.status()
        result = await job.result(timeout=5) if status.state is JobState.DONE else None  # read at once
        return status, result

    status, result = run(ctx, read, redis, namespace)
    if as_json:
        print_json({**job_row(status), "result": result})
    else:
        shown: dict[str, Any] = {**status.to_dict(), "error": _error_line(status) or None}
        for name in ("submitted", "due", "queued", "started", "finished"):
            moment = getattr(status, name)
            shown[name] = shown_time(moment) if moment else None
        if status.state is JobState.DONE:
            shown["result"] = json.dumps(result, default=str)
        for name, value in shown.items():
            if value is not None:
                out.print(f"{name:>10}  {escape(str(value))}")
    if status.state in (JobState.FAILED, JobState.DEAD, JobState.CANCELLED):
        raise typer.Exit(EXIT_CALL_FAILED)


@app.command("schedules", cls=Command)
def schedules_command(
    ctx: typer.Context,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List the periodic methods of every service, with their last and next ticks and last run's job."""

    async def read(client: Client) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for info in await list_services(client.redis, client.keys, live_only=False):
            periodic = [m for m in info.methods if "periodic" in m.get("decorators", {})]
            if not periodic:
                continue
            raw = await client.redis.hgetall(client.keys.schedule(info.name))
            state = {text(k): text(v) for k, v in raw.items()}
            for method in periodic:
                options = method["decorators"]["periodic"]
                name = method["name"]
                every = options.get("every")
                rows.append({
                    "service": info.name, "method": name,
                    "schedule": f"every {every:g} s" if every is not None else f"cron {options.get('cron')}",
                    "last": _tick(state.get(f"{name}:last")), "next": _tick(state.get(f"{name}:next")),
                    "last_job": state.get(f"{name}:job"), "last_state": None, "last_error": None,
                })  # fmt: skip
                if rows[-1]["last_job"]:
                    rows[-1].update(await _outcome(client, rows[-1]["last_job"]))
        return rows

    rows = run(ctx, read, redis, namespace)
    if as_json:
        print_json(rows)
        return
    table = Table("service", "method", "schedule", "last", "next", "last job", "last state", "last error")
    for row in rows:
        last, following = (_shown(row["last"]), _shown(row["next"]))
        table.add_row(row["service"], row["method"], row["schedule"], last, following,
                      escape(row["last_job"] or "-"), row["last_state"] or "-",
                      escape(row["last_error"] or "-"))  # fmt: skip
    out.print(table if rows else "no periodic methods")


async def _outcome(client: Client, job_id: str) -> dict[str, str | None]:
    """The last run's state and error, as its job says (its outcome kept result_ttl: then expired)."""
    try:
        status = await client.job(job_id).status()
    except (JobNotFound, ConfigError):
        return {"last_state": "expired", "last_error": None}
    error = f"{status.error.type}: {status.error.message}" if status.error else None
    return {"last_state": str(status.state), "last_error": error}


def _tick(raw: str | None) -> str | None:
    if not raw or not raw.isdigit():
        return None
    return iso(datetime.fromtimestamp(int(raw) / 1000, tz=UTC))


def _shown(stamp: str | None) -> str:
    return "-" if stamp is None else stamp[:19].replace("T", " ")
