"""``titan``: inspect services and call them from the shell.

Exit codes (also in README.md):
  0  success
  1  the call failed (remote error, timeout, no live worker, backlog full)
  2  bad command line
  4  Redis unreachable or refused the credentials
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio
import typer
from rich.console import Console
from rich.table import Table

from titan_broker.client import Client
from titan_broker.config import ENV_NAMESPACE, ENV_URL
from titan_broker.dead_letters import list_dead_letters, purge_dead_letters, replay_dead_letters
from titan_broker.errors import ConfigError, RedisUnavailable, TitanError
from titan_broker.registry import list_services

EXIT_CALL_FAILED = 1
EXIT_USAGE = 2
EXIT_REDIS = 4

R = TypeVar("R")

app = typer.Typer(help="Inspect and call titan-broker services.", add_completion=False, no_args_is_help=True)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per error, never wrapped


@dataclass(frozen=True)
class _Settings:
    url: str | None
    namespace: str | None


@app.callback()
def _main(
    ctx: typer.Context,
    redis: Annotated[str | None, typer.Option("--redis", envvar=ENV_URL, help="Redis URL.")] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", envvar=ENV_NAMESPACE, help="Key namespace.")
    ] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging.")] = 0,
) -> None:
    """Inspect and call titan-broker services."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    ctx.obj = _Settings(redis, namespace)


def _run(ctx: typer.Context, work: Callable[[Client], Awaitable[R]]) -> R:
    """Connect, run ``work``, and turn titan errors into one line and an exit code."""
    settings: _Settings = ctx.obj

    async def main() -> R:
        async with Client(settings.url, namespace=settings.namespace) as client:
            return await work(client)

    try:
        return anyio.run(main)
    except TitanError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        code = (
            EXIT_REDIS
            if isinstance(exc, RedisUnavailable)
            else EXIT_USAGE
            if isinstance(exc, ConfigError)
            else EXIT_CALL_FAILED
        )
        raise typer.Exit(code) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@app.command()
def services(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the services that have at least one live worker."""
    found = _run(ctx, lambda c: list_services(c.redis, c.keys))
    if as_json:
        _print_json([s.to_dict() for s in found])
        return
    if not found:
        out.print("no live services (start one with: titan-worker run FILE)")
        return
    table = Table(title="services")
    for col in ("service", "version", "workers", "in flight", "calls", "methods"):
        table.add_column(col)
    for s in found:
        table.add_row(
            s.name,
            s.version,
            str(len(s.workers)),
            str(sum(w.in_flight for w in s.workers)),
            str(sum(w.calls for w in s.workers)),
            "\n".join(m.get("signature", m.get("name", "?")) for m in s.methods),
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
                return await replay_dead_letters(c.redis, c.keys, service, ids, timeout=timeout)
            return await purge_dead_letters(c.redis, c.keys, service, ids)

        count = _run(ctx, act)
        if as_json:
            _print_json({"replayed" if replay else "purged": count})
        else:
            out.print(f"{'replayed' if replay else 'purged'} {count} dead letter(s) of {service!r}")
        return
    letters = _run(ctx, lambda c: list_dead_letters(c.redis, c.keys, service, count=1000))
    if as_json:
        _print_json([d.to_dict() for d in letters])
        return
    if not letters:
        out.print(f"no dead letters for {service!r}")
        return
    table = Table(title=f"dead letters of {service}")
    for col in ("id", "method", "deliveries", "reason"):
        table.add_column(col)
    for d in letters:
        table.add_row(d.id, d.method or "?", str(d.deliveries), d.reason)
    out.print(table)


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
    result = _run(ctx, lambda c: c.call(service, method, values, timeout=timeout))
    _print_json(result)
