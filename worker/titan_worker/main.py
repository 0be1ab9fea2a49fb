"""``titan-worker run FILE``: serve a service file until SIGTERM.

Exit codes (also in README.md):
  0  stopped cleanly after a drain
  1  crashed (an unexpected error; see the log)
  2  bad command line (typer's usage error)
  3  bad service file: not found, import failed, no or several @process classes
  4  Redis unreachable or refused the credentials
  5  the service's init() raised
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import anyio
import typer
from typer.core import TyperArgument, TyperCommand

import titan_broker
from titan_broker._config import (
    ENV_NAMESPACE,
    ENV_URL,
    WorkerOptions,
    redact,
    resolve_namespace,
    resolve_url,
)
from titan_broker._errors import ConfigError, RedisUnavailable, ServiceFileError
from titan_broker._redis import Acting, access_denied, is_denied
from titan_broker._service import load_service_file

from .logs import configure
from .worker import InitError, Worker


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


EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BAD_FILE = 3
EXIT_REDIS = 4
EXIT_INIT = 5

ENV_DEPENDENCIES = "TITAN_DEPENDENCIES"

logger = logging.getLogger("titan_worker")
banner_logger = logging.getLogger("titan_worker.start")
banner_logger.setLevel(logging.INFO)  # the start banner shows without -v

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
    deps: dict[str, Any] = {}
    env = os.environ.get(ENV_DEPENDENCIES)
    if env:
        loaded = json.loads(env)
        if not isinstance(loaded, dict):
            raise typer.BadParameter(f"${ENV_DEPENDENCIES} must be a JSON object")
        deps.update(loaded)
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.isidentifier():
            raise typer.BadParameter(f"{item!r} is not NAME=JSON", param_hint="--dep")
        try:
            deps[name] = json.loads(raw)
        except json.JSONDecodeError:
            deps[name] = raw  # a bare word is taken as a string, as in `titan call`
    return deps


class _Ready:
    """Reports readiness or the start-up error on a pipe to the parent (pm.spawn)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, **message: Any) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (json.dumps(message) + "\n").encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None


def _banner(worker: Worker, url: str, namespace: str) -> None:
    """One line at start, without -v: what serves, from where (the URL's password hidden)."""
    methods = sorted(worker.definition.methods)
    banner_logger.info(
        "serving %s %s as %s (pid %d): %d method(s): %s; Redis %s, namespace %s, concurrency %d",
        worker.service, worker.definition.info.version, worker.worker_id, os.getpid(), len(methods),
        ", ".join(methods), redact(url), namespace, worker.options.concurrency,
        extra={"service": worker.service, "version": worker.definition.info.version,
               "worker_id": worker.worker_id, "pid": os.getpid(), "methods": methods, "redis": redact(url),
               "namespace": namespace, "concurrency": worker.options.concurrency},
    )  # fmt: skip


async def _serve(worker: Worker, ready: _Ready, banner: tuple[str, str] | None = None) -> None:
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if worker.stopping:
                        logger.warning("second signal: stopping without waiting for calls in flight")
                        tg.cancel_scope.cancel()
                    logger.info("received %s", signal.Signals(signum).name)
                    worker.stop()

        tg.start_soon(watch_signals)

        async def serve_then_stop(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            await worker.run(task_status=task_status)
            tg.cancel_scope.cancel()  # drained: only the signal watcher is left

        await tg.start(serve_then_stop)
        streaming = sorted(m.name for m in worker.definition.methods.values() if m.streaming)
        methods = sorted(worker.definition.methods)
        ready.send(event="ready", service=worker.service, worker_id=worker.worker_id,
                   pid=os.getpid(), methods=methods, streaming=streaming)  # fmt: skip
        if banner is not None:
            _banner(worker, *banner)


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (task groups wrap errors)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


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
    ready = _Ready(ready_fd)
    # --redis and --namespace after `run` win over the ones before it, which read the environment.
    before: _Settings = ctx.find_object(_Settings) or _Settings(None, None)
    redis = redis or before.url
    namespace = namespace or before.namespace

    def fail(code: int, message: str) -> typer.Exit:
        print(f"titan-worker: {message}", file=sys.stderr)
        ready.send(event="error", code=code, message=message)
        return typer.Exit(code)

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
                health_interval=health_interval,
                health_timeout=health_timeout,
                parent_pid=parent_pid,
                metrics_port=metrics_port,
                expose_tracebacks=expose_tracebacks,
            )
        )
        definition = load_service_file(file)
        worker = Worker(definition, url=url, namespace=resolve_namespace(namespace), options=options,
                        dependencies=deps, service_name=name, worker_id=worker_id)  # fmt: skip
    except ServiceFileError as exc:
        cause = exc.__cause__
        if cause is not None and verbose:  # an import that failed, maybe deep in the service's own modules
            sys.stderr.write("".join(traceback.format_exception(cause)))
        hint = " (run with -v for its traceback)" if cause is not None and not verbose else ""
        raise fail(EXIT_BAD_FILE, f"{exc}{hint}") from None
    except (ConfigError, typer.BadParameter, json.JSONDecodeError, TypeError) as exc:
        raise fail(2, str(exc)) from None
    banner = None if ready_fd is not None else (url, resolve_namespace(namespace))  # a manager reports itself
    try:
        anyio.run(_serve, worker, ready, banner)
    except Exception as group:
        error = _leaf(group)
        if is_denied(error):  # the worker's ACL user lacks a permission: say which, not a traceback
            user = urllib.parse.urlsplit(url).username or None
            error = access_denied(error, f"serve {worker.service!r}", who=Acting("worker", user))
        if isinstance(error, RedisUnavailable):
            raise fail(EXIT_REDIS, str(error)) from None
        if isinstance(error, InitError):
            raise fail(EXIT_INIT, f"{file}: {error}") from None
        logger.error("worker crashed", exc_info=error)
        raise fail(EXIT_CRASH, f"crashed: {type(error).__name__}: {error}") from None
    _exit_past_abandoned_threads()


def _exit_past_abandoned_threads() -> None:
    """Exit now even if a plain ``def`` method still runs in a thread the drain abandoned.

    A thread cannot be interrupted, and Python would wait for it at exit:
    a worker must never outlive its grace period because of one.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    until = time.monotonic() + 1.0  # idle pool threads end at once; give them a moment
    for thread in others:
        thread.join(max(0.0, until - time.monotonic()))
    stuck = [t for t in others if t.is_alive()]
    if stuck:
        logger.warning("exiting with %d method thread(s) still running (past the grace period)", len(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
