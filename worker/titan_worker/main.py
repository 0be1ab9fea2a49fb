"""``titan-worker run FILE``: serve a service file until SIGTERM.

Exit codes (also in README.md):
  0  stopped cleanly after a drain, or by a signal before it served
  1  crashed (an unexpected error; see the log)
  2  bad command line (typer's usage error)
  3  bad service file: not found, import failed, no or several @process classes
  4  Redis unreachable or refused the credentials
  5  the service's init() raised
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperArgument, TyperCommand

import titan_broker
from titan_broker._config import (
    ENV_NAMESPACE,
    ENV_URL,
    WorkerOptions,
    resolve_namespace,
    resolve_url,
)
from titan_broker._errors import ConfigError

from .logs import configure
from .start import EXIT_OK, EXIT_USAGE, Ready, dependencies_from_env, serve_file


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


# rich_markup_mode=None: click's help layout, with each option's metavar and its whole name.
app = typer.Typer(
    help="Run titan-broker worker processes.",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
)


@dataclass(frozen=True)
class _Settings:
    url: str | None
    namespace: str | None


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"titan-worker {titan_broker.__version__}")
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
) -> None:
    """Run titan-broker worker processes."""
    ctx.obj = _Settings(redis, namespace)


def _parse_deps(items: list[str]) -> dict[str, Any]:
    deps = dependencies_from_env()
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.isidentifier():
            raise typer.BadParameter(f"{item!r} is not NAME=JSON", param_hint="--dep")
        try:
            deps[name] = json.loads(raw)
        except json.JSONDecodeError:
            deps[name] = raw  # a bare word is taken as a string, as in `titan call`
    return deps


@app.command(cls=Command)
def run(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(metavar="FILE", help="Python file holding exactly one @process class.")
    ],
    redis: Annotated[
        str | None,
        typer.Option("--redis", metavar="URL", help="Redis URL (default: $TITAN_REDIS_URL)."),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", metavar="NAME", help="Key namespace (default: $TITAN_NAMESPACE)."),
    ] = None,
    concurrency: Annotated[int, typer.Option(metavar="N", help="Calls run at once by this worker.")] = 16,
    dep: Annotated[
        list[str] | None,
        typer.Option("--dep", metavar="NAME=JSON", help="Dependency for init() (repeatable)."),
    ] = None,
    name: Annotated[str | None, typer.Option(metavar="NAME", help="Serve under this service name.")] = None,
    grace: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds calls in flight may take on shutdown.")
    ] = 30.0,
    heartbeat_ttl: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Seconds after its last heartbeat a worker counts as dead."),
    ] = 5.0,
    heartbeat_interval: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds between heartbeats.")
    ] = 1.0,
    max_deliveries: Annotated[
        int | None,
        typer.Option(metavar="N", help="Dead-letter a call delivered more often (default: the service's)."),
    ] = None,
    max_payload: Annotated[
        int, typer.Option(metavar="BYTES", help="Largest request or reply, in bytes.")
    ] = 1024 * 1024,
    shards: Annotated[
        int | None,
        typer.Option(
            metavar="K",
            help="Spread the service's calls over K slots (default: the service's @process(shards=...)); "
            "every worker of a service must use the same K.",
        ),
    ] = None,
    health_interval: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds between @health_check runs.")
    ] = 5.0,
    health_timeout: Annotated[
        float, typer.Option(metavar="SECONDS", help="A slower health check counts as unhealthy.")
    ] = 2.0,
    worker_id: Annotated[
        str | None, typer.Option(metavar="ID", help="Consumer name (default host-pid-random).")
    ] = None,
    ready_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    options_json: Annotated[
        str | None,
        typer.Option(hidden=True, help="All WorkerOptions as JSON (pm.spawn); replaces the flags."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(metavar="PORT", help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics."),
    ] = None,
    parent_pid: Annotated[
        int | None,
        typer.Option(metavar="PID", help="Drain and exit when this process (the manager) is gone."),
    ] = None,
    expose_tracebacks: Annotated[
        bool, typer.Option(help="Send tracebacks of failed calls to callers (for development).")
    ] = False,
    log_format: Annotated[
        Literal["text", "json"],
        typer.Option(metavar="text|json", help="Log lines as text, or as JSON objects for log shippers."),
    ] = "text",
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging.")] = 0,
) -> None:
    """Serve FILE's service from Redis until SIGTERM or Ctrl-C, then drain and exit 0."""
    configure(verbose, log_format)
    ready = Ready(ready_fd)
    # --redis and --namespace after `run` win over the ones before it, which read the environment.
    before: _Settings = ctx.find_object(_Settings) or _Settings(None, None)
    redis = redis or before.url
    namespace = namespace or before.namespace
    try:
        deps = _parse_deps(dep or [])
        url = resolve_url(redis)
        options = (
            replace(WorkerOptions(**json.loads(options_json)), parent_pid=parent_pid)
            if options_json
            else WorkerOptions(
                concurrency=concurrency,
                grace_period=grace,
                heartbeat_ttl=heartbeat_ttl,
                heartbeat_interval=heartbeat_interval,
                max_deliveries=max_deliveries,
                max_payload=max_payload,
                shards=shards,
                health_interval=health_interval,
                health_timeout=health_timeout,
                parent_pid=parent_pid,
                metrics_port=metrics_port,
                expose_tracebacks=expose_tracebacks,
            )
        )
        resolved_namespace = resolve_namespace(namespace)
    except (ConfigError, typer.BadParameter, json.JSONDecodeError, TypeError) as exc:
        raise typer.Exit(ready.fail(EXIT_USAGE, str(exc))) from None
    code = serve_file(file, url=url, namespace=resolved_namespace, options=options, dependencies=deps,
                      ready=ready, name=name, worker_id=worker_id, verbose=verbose)  # fmt: skip
    if code != EXIT_OK:
        raise typer.Exit(code)
