"""``titan submit``, ``cancel``, ``purge`` and ``forget``: acting on a namespace from the shell."""

from __future__ import annotations

from typing import Annotated, Any, cast

import typer
from rich.markup import escape

from titan_broker._calling import Client, split_id
from titan_broker._calling import cancel as cancel_job
from titan_broker._errors import CallError
from titan_broker._redis import text
from titan_broker._registry import (
    forget_service,
    list_workers,
    registered_users,
    request_streams,
    service_scopes,
)
from titan_broker._wire import GROUP, protocol

from .common import (
    EXIT_CALL_FAILED,
    CallArguments,
    Command,
    JsonOption,
    MethodArgument,
    NamespaceOption,
    RedisOption,
    ServiceArgument,
    app,
    confirm,
    err,
    out,
    parse_arguments,
    print_json,
    run,
    services_named,
)


class ServiceInUse(CallError):
    """``titan forget`` of a service that still has live workers."""


@app.command(cls=Command)
def submit(
    ctx: typer.Context,
    service: ServiceArgument,
    method: MethodArgument,
    args: CallArguments = None,
    delay: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Start no earlier than this from now.")
    ] = None,
    deadline: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Seconds the job may take once started.")
    ] = None,
    result_ttl: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds its outcome is kept after it ends.")
    ] = 86400.0,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Queue SERVICE.METHOD(ARGS...) as a background job and print its id (read it with titan job)."""
    values, kwargs = parse_arguments(args or [])

    async def send(c: Client) -> str:
        await services_named(c, service)
        return await c.submit(
            service, method, values, kwargs, delay=delay, deadline=deadline, result_ttl=result_ttl
        )

    job_id = run(ctx, send, redis, namespace, role="caller")
    if as_json:
        print_json({"id": job_id})
    else:
        out.print(escape(job_id), highlight=False)


@app.command("cancel", cls=Command)
def cancel_command(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id, as submit returned it.")],
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Cancel a job that has not started; exit 1 if it runs or has ended (it is left as it is)."""

    async def act(c: Client) -> str:
        service, token = split_id(job_id)
        await services_named(c, service)
        outcome = await cancel_job(c.redis, c.keys, service, c.keys.job(service, token))
        if outcome == "unknown":
            await c.job(job_id).status()  # raises JobNotFound, saying why it may be unknown
        return outcome

    state = run(ctx, act, redis, namespace, role="operator")
    cancelled = state == "cancelled"
    if as_json:
        print_json({"id": job_id, "cancelled": cancelled, "state": state})
    elif cancelled:
        out.print(f"cancelled {escape(job_id)}", highlight=False)
    else:
        err.print(f"not cancelled: job {escape(job_id)} is {state}", highlight=False)
    if not cancelled:
        raise typer.Exit(EXIT_CALL_FAILED)


async def purge_waiting(c: Client, service: str) -> int:
    """Delete the calls on ``service``'s streams (every shard's, every registered user's) that no
    worker has taken yet; a job among them is cancelled (its hash says so). Calls a worker takes
    meanwhile still run."""
    purged = 0
    users = await registered_users(c.redis, c.keys, service)
    for scope in await service_scopes(c.redis, c.keys, service):
        for stream in request_streams(c.keys, scope, users):
            purged += await _purge_stream(c, service, stream)
    return purged


async def _purge_stream(c: Client, service: str, stream: str) -> int:
    """``purge_waiting`` on one request stream."""
    try:
        groups = cast(list[dict[Any, Any]], await c.redis.xinfo_groups(stream))
    except Exception:  # no stream yet: nothing waits
        return 0
    last = next((g.get("last-delivered-id") for g in groups if text(g.get("name", b"")) == GROUP), None)
    start = "(" + text(last) if last is not None else "-"
    purged = 0
    while True:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await c.redis.xrange(stream, start, "+", 500))
        if not entries:
            return purged
        plain: list[bytes] = []
        for entry_id, fields in entries:
            token = protocol.job_token(fields)
            if token is None:
                plain.append(entry_id)
            elif await cancel_job(c.redis, c.keys, service, c.keys.job(service, token)) == "cancelled":
                purged += 1
        if plain:
            purged += int(await c.redis.xdel(stream, *plain))
        start = "(" + text(entries[-1][0])


@app.command(cls=Command)
def purge(
    ctx: typer.Context,
    service: ServiceArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Delete a service's waiting calls (those no worker has taken); its waiting jobs are cancelled.

    Their callers get no answer and time out. Calls running are left to finish."""
    confirm(f"delete every waiting call of {service!r}?", yes)

    async def act(c: Client) -> int:
        await services_named(c, service)
        return await purge_waiting(c, service)

    count = run(ctx, act, redis, namespace, role="operator")
    if as_json:
        print_json({"purged": count})
    else:
        out.print(f"purged {count} waiting call(s) of {escape(repr(service))}", highlight=False)


@app.command(cls=Command)
def forget(
    ctx: typer.Context,
    service: ServiceArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Remove a service with no live worker from the registry, with its waiting calls, dead letters,
    delayed calls and schedule. Refused (exit 1) while a worker of it lives."""
    confirm(f"forget service {service!r} and its calls and dead letters?", yes)

    async def act(c: Client) -> None:
        await services_named(c, service)
        live = await list_workers(c.redis, c.keys, service)
        if live:
            ids = ", ".join(w.worker_id for w in live)
            raise ServiceInUse(
                f"service {service!r} has {len(live)} live worker(s) ({ids}): "
                "stop them first (SIGTERM), then forget it"
            )
        await forget_service(c.redis, c.keys, service)

    run(ctx, act, redis, namespace, role="operator")
    if as_json:
        print_json({"forgot": service})
    else:
        out.print(f"forgot {escape(repr(service))}", highlight=False)
