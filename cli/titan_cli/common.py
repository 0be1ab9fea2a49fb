"""What every ``titan`` command shares: the app, its consoles, connecting, errors as exit codes, JSON."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import anyio
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand

import titan_broker
from titan_broker._calling import Client
from titan_broker._config import ENV_NAMESPACE, ENV_URL
from titan_broker._errors import ConfigError, RedisUnavailable, RemoteError, TitanError
from titan_broker._redis import REDIS_ERRORS, Acting, acting, titan_error
from titan_broker._registry import known_services


class _Argument(TyperArgument):
    """An argument shown by its metavar alone (FILE, [SERVICE]), not as ``{file} <str>``."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        return self.metavar or super()._usage_display_name()


class Command(TyperCommand):
    """A command whose help names its arguments by their metavars only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is TyperArgument:
                param.__class__ = _Argument


EXIT_CALL_FAILED = 1
EXIT_USAGE = 2
EXIT_UNKNOWN = 3
EXIT_REDIS = 4


class UnknownService(TitanError):
    """The service never registered in this namespace."""


R = TypeVar("R")

# rich_markup_mode=None: click's own help layout, which shows each option's metavar (URL, SECONDS)
# and never cuts an option's name to fit a column.
app = typer.Typer(
    help="Inspect and call titan-broker services.",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
)
# Piped output is not cut at 80 columns: scripts and logs get whole rows.
# emoji=False: ``:a:`` in a job id or a message is text, not an emoji.
out = Console(width=None if sys.stdout.isatty() else 200, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # one line per error, never wrapped


@dataclass(frozen=True)
class _Settings:
    url: str | None
    namespace: str | None


# Accepted before the command (``titan --redis URL services``) and after it (``titan services
# --redis URL``); after it wins. Only the one before the command reads the environment, so an
# explicit flag anywhere beats $TITAN_REDIS_URL.
RedisOption = Annotated[
    str | None, typer.Option("--redis", metavar="URL", help="Redis URL (default: $TITAN_REDIS_URL).")
]
NamespaceOption = Annotated[
    str | None,
    typer.Option("--namespace", "-n", metavar="NAME", help="Key namespace (default: $TITAN_NAMESPACE)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ServiceArgument = Annotated[str, typer.Argument(metavar="SERVICE", help="Service name.")]
MethodArgument = Annotated[str, typer.Argument(metavar="METHOD", help="Public method name.")]
CallArguments = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[ARGS]...",
        help="Arguments: VALUE positional, NAME=VALUE keyword; each VALUE JSON, else a string.",
    ),
]


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
    redis: Annotated[
        str | None, typer.Option("--redis", metavar="URL", envvar=ENV_URL, help="Redis URL.")
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", metavar="NAME", envvar=ENV_NAMESPACE, help="Key namespace."),
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


def run(
    ctx: typer.Context,
    work: Callable[[Client], Awaitable[R]],
    redis: str | None = None,
    namespace: str | None = None,
    role: str = "observer",
) -> R:
    """Connect, run ``work``, and turn titan errors into one line and an exit code.

    ``role``: whose ACL rule the command needs (``titan acl ROLE``), named when Redis refuses it.

    ``redis`` and ``namespace``: the command's own --redis and --namespace, which win over the
    ones given before the command."""
    found: _Settings | None = ctx.find_object(_Settings)
    before = found or _Settings(None, None)
    settings = _Settings(redis or before.url, namespace or before.namespace)

    async def main() -> R:
        acting.set(Acting(role))
        async with Client(settings.url, namespace=settings.namespace) as client:
            try:
                return await work(client)
            except REDIS_ERRORS as exc:  # a refusal (ACL) or an outage in the middle of the command
                raise titan_error(exc, f"run titan {ctx.info_name}") from exc

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


def confirm(question: str, yes: bool) -> None:
    """Go on after asking ``question`` at a terminal, or at once with ``yes`` (``--yes``).

    Not at a terminal and without --yes: refused (exit 2), nothing done. Declined: exit 1."""
    if yes:
        return
    if not sys.stdin.isatty():
        refused = f"{question} Not at a terminal: pass --yes to confirm."
        err.print(f"[red]error:[/] {escape(refused)}", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    if not typer.confirm(question, err=True):
        err.print("nothing done", highlight=False)
        raise typer.Exit(EXIT_CALL_FAILED)


async def services_named(client: Client, service: str | None) -> list[str]:
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


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=json_default) + "\n")


def print_json_line(value: Any) -> None:
    """One JSON document on one line, flushed (JSON lines: streamed items, ``top --json``)."""
    sys.stdout.write(json.dumps(value, default=json_default) + "\n")
    sys.stdout.flush()


def json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):  # a msgpack timestamp (PROTOCOL.md, Values)
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def iso(moment: datetime | float | None) -> str | None:
    """The one time format of JSON output: ISO 8601 in UTC, to the millisecond.

    ``moment``: a datetime, or seconds since the epoch (as registry records hold them); 0 and
    None are unknown (None)."""
    if moment is None or (not isinstance(moment, datetime) and moment <= 0):
        return None
    when = moment if isinstance(moment, datetime) else datetime.fromtimestamp(moment, tz=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


def shown_time(moment: datetime | float | None) -> str:
    """The one time format of tables: ``YYYY-MM-DD HH:MM:SS`` in UTC ('-' when unknown)."""
    stamp = iso(moment)
    return "-" if stamp is None else stamp[:19].replace("T", " ")


def ms(value: float | None) -> str:
    """A latency in a table: two decimals, '-' when there is none (an idle worker or method)."""
    return "-" if value is None else f"{value:.2f}"


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_arguments(raw: list[str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments from the command line: ``NAME=JSON`` is a keyword argument
    (NAME a Python identifier), anything else positional; each value JSON, else a string.
    A positional string holding '=' is passed as JSON: '"a=b"'."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in raw:
        name, sep, value = item.partition("=")
        if sep and name.isidentifier():
            if name in kwargs:
                raise typer.BadParameter(f"keyword argument {name!r} given twice", param_hint="ARGS")
            kwargs[name] = _parse_value(value)
        elif kwargs:
            raise typer.BadParameter(
                f"positional argument {item!r} after a keyword argument", param_hint="ARGS"
            )
        else:
            args.append(_parse_value(item))
    return tuple(args), kwargs
