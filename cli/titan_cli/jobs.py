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

from .common import EXIT_CALL_FAILED, app, out, print_json, run


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


@app.command("jobs")
def jobs_command(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="The service whose jobs to list.")],
    status: Annotated[
        JobState | None, typer.Option("--status", help="Only jobs in this state.", case_sensitive=False)
    ] = None,
    count: Annotated[int, typer.Option("--count", help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List a service's latest jobs (submitted, periodic runs), newest first."""
    found = run(ctx, lambda c: list_jobs(c.redis, c.keys, service, state=status, count=count))
    if as_json:
        print_json([job.to_dict() for job in found])
        return
    table = Table("job", "method", "state", "attempts", "submitted", "finished", "error")
    for job in found:
        error = f"{job.error.type}: {job.error.message}" if job.error else ""
        table.add_row(
            escape(job.id), job.method, str(job.state), str(job.attempts), _when(job.submitted),
            _when(job.finished), escape(error[:60]),
        )  # fmt: skip
    out.print(table if found else f"no jobs of {service!r}" + (f" {status}" if status else ""))


@app.command("job")
def job_command(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id, as submit returned it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show one job: where it stands, and its result or error once it ended."""

    async def read(client: Client) -> tuple[JobStatus, Any]:
        job: Job[Any] = client.job(job_id)  # a malformed id: ConfigError, a usage error
        status = await job.status()
        result = await job.result(timeout=5) if status.state is JobState.DONE else None  # read at once
        return status, result

    status, result = run(ctx, read)
    shown = {**status.to_dict(), "result": result}
    if as_json:
        print_json(shown)
    else:
        for name, value in shown.items():
            if value is not None:
                shown_value = json.dumps(value, default=str) if name == "result" else str(value)
                out.print(f"{name:>10}  {escape(shown_value)}")
    if status.state in (JobState.FAILED, JobState.DEAD, JobState.CANCELLED):
        raise typer.Exit(EXIT_CALL_FAILED)


@app.command("schedules")
def schedules_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
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

    rows = run(ctx, read)
    if as_json:
        print_json(rows)
        return
    table = Table("service", "method", "schedule", "last tick", "next tick", "last job", "state", "error")
    for row in rows:
        table.add_row(row["service"], row["method"], row["schedule"], row["last"] or "-", row["next"] or "-",
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
    return datetime.fromtimestamp(int(raw) / 1000, tz=UTC).isoformat()
