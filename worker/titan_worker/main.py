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
from dataclasses import replace
from typing import Annotated, Any

import anyio
import typer

import titan_broker
from titan_broker._config import (
    ENV_NAMESPACE,
    ENV_URL,
    WorkerOptions,
    resolve_namespace,
    resolve_url,
)
from titan_broker._errors import ConfigError, RedisUnavailable, ServiceFileError
from titan_broker._service import load_service_file

from .worker import InitError, Worker

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BAD_FILE = 3
EXIT_REDIS = 4
EXIT_INIT = 5

ENV_DEPENDENCIES = "TITAN_DEPENDENCIES"

logger = logging.getLogger("titan_worker")

app = typer.Typer(help="Run titan-broker worker processes.", add_completion=False, no_args_is_help=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"titan-worker {titan_broker.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Run titan-broker worker processes."""


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


async def _serve(worker: Worker, ready: _Ready) -> None:
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


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (task groups wrap errors)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@app.command()
def run(
    file: Annotated[str, typer.Argument(help="Python file holding exactly one @process class.")],
    redis: Annotated[str | None, typer.Option("--redis", envvar=ENV_URL, help="Redis URL.")] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", envvar=ENV_NAMESPACE, help="Key namespace.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Calls run at once by this worker.")] = 16,
    dep: Annotated[
        list[str] | None,
        typer.Option("--dep", help="Dependency for init(): NAME=JSON (repeatable)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Serve under this service name.")] = None,
    grace: Annotated[float, typer.Option(help="Seconds calls in flight may take on shutdown.")] = 30.0,
    heartbeat_ttl: Annotated[
        float, typer.Option(help="Seconds after its last heartbeat that a worker counts as dead.")
    ] = 5.0,
    heartbeat_interval: Annotated[float, typer.Option(help="Seconds between heartbeats.")] = 1.0,
    max_deliveries: Annotated[
        int | None, typer.Option(help="Dead-letter a call delivered more often (default: the service's).")
    ] = None,
    max_payload: Annotated[int, typer.Option(help="Largest request or reply, in bytes.")] = 1024 * 1024,
    health_interval: Annotated[float, typer.Option(help="Seconds between @health_check runs.")] = 5.0,
    health_timeout: Annotated[float, typer.Option(help="A slower health check counts as unhealthy.")] = 2.0,
    worker_id: Annotated[str | None, typer.Option(help="Consumer name (default host-pid-random).")] = None,
    ready_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    options_json: Annotated[
        str | None,
        typer.Option(hidden=True, help="All WorkerOptions as JSON (pm.spawn); replaces the flags."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics.")
    ] = None,
    parent_pid: Annotated[
        int | None, typer.Option(help="Drain and exit when this process (the manager) is gone.")
    ] = None,
    expose_tracebacks: Annotated[
        bool, typer.Option(help="Send tracebacks of failed calls to callers (for development).")
    ] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging.")] = 0,
) -> None:
    """Serve FILE's service from Redis until SIGTERM or Ctrl-C, then drain and exit 0."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    ready = _Ready(ready_fd)

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
        raise fail(EXIT_BAD_FILE, str(exc)) from None
    except (ConfigError, typer.BadParameter, json.JSONDecodeError, TypeError) as exc:
        raise fail(2, str(exc)) from None
    try:
        anyio.run(_serve, worker, ready)
    except Exception as group:
        error = _leaf(group)
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
