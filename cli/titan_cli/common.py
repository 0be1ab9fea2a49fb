"""What every ``titan`` command shares: the app, its consoles, connecting, errors as exit codes, JSON."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

import anyio
import typer
from rich.console import Console
from rich.markup import escape

import titan_broker
from titan_broker._calling import Client
from titan_broker._config import ENV_NAMESPACE, ENV_URL
from titan_broker._errors import ConfigError, RedisUnavailable, RemoteError, TitanError

EXIT_CALL_FAILED = 1
EXIT_USAGE = 2
EXIT_UNKNOWN = 3
EXIT_REDIS = 4


class UnknownService(TitanError):
    """The service never registered in this namespace."""


R = TypeVar("R")

app = typer.Typer(help="Inspect and call titan-broker services.", add_completion=False, no_args_is_help=True)
# Piped output is not cut at 80 columns: scripts and logs get whole rows.
# emoji=False: ``:a:`` in a job id or a message is text, not an emoji.
out = Console(width=None if sys.stdout.isatty() else 200, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # one line per error, never wrapped


@dataclass(frozen=True)
class _Settings:
    url: str | None
    namespace: str | None


def _print_version(value: bool) -> None:
    if value:
        out.print(f"titan {titan_broker.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
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


def run(ctx: typer.Context, work: Callable[[Client], Awaitable[R]]) -> R:
    """Connect, run ``work``, and turn titan errors into one line and an exit code."""
    settings: _Settings = ctx.obj

    async def main() -> R:
        async with Client(settings.url, namespace=settings.namespace) as client:
            return await work(client)

    try:
        return anyio.run(main)
    except TitanError as exc:
        error_id = exc.details.get("error_id") if isinstance(exc, RemoteError) else None
        where = f" [error {error_id}: its traceback is in the worker's log]" if error_id else ""
        err.print(f"[red]error:[/] {escape(str(exc) + where)}", highlight=False)
        code = EXIT_CALL_FAILED
        codes = ((RedisUnavailable, EXIT_REDIS), (ConfigError, EXIT_USAGE), (UnknownService, EXIT_UNKNOWN))
        for kind, exit_code in codes:
            if isinstance(exc, kind):
                code = exit_code
        raise typer.Exit(code) from None


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=json_default) + "\n")


def json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):  # a msgpack timestamp (PROTOCOL.md, Values)
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
