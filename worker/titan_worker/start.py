"""Serving a service file until SIGTERM, and the lean entry point of the workers a manager spawns.

``python -m titan_worker.start FILE --worker-id ID --ready-fd FD [--parent-pid PID]
[--options-json JSON] [--name NAME]``, with the Redis URL, namespace and
dependencies in the environment (``$TITAN_REDIS_URL``, ``$TITAN_NAMESPACE``,
``$TITAN_DEPENDENCIES``): what ``pm.spawn`` and pools run. It reads only
what a manager passes and imports no command-line framework, so a worker
starts sooner and holds less memory; ``titan-worker run`` (``main``) is the
command for people, with every option, its help and the same exit codes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc
from redis import exceptions as rexc

from titan_broker._config import WorkerOptions, redact, resolve_namespace, resolve_url, url_user
from titan_broker._errors import ConfigError, RedisUnavailable, ServiceFileError
from titan_broker._redis import Acting, access_denied, is_denied
from titan_broker._service import load_service_file

from .logs import configure
from .worker import InitError, Worker

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_BAD_FILE = 3
EXIT_REDIS = 4
EXIT_INIT = 5

ENV_DEPENDENCIES = "TITAN_DEPENDENCIES"

logger = logging.getLogger("titan_worker")
banner_logger = logging.getLogger("titan_worker.start")
banner_logger.setLevel(logging.INFO)  # the start banner shows without -v


def dependencies_from_env() -> dict[str, Any]:
    """The dependencies a manager passes in ``$TITAN_DEPENDENCIES`` (a JSON object); ConfigError if
    it is not one."""
    env = os.environ.get(ENV_DEPENDENCIES)
    if not env:
        return {}
    try:
        loaded = json.loads(env)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"${ENV_DEPENDENCIES} is not JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"${ENV_DEPENDENCIES} must be a JSON object")
    return loaded


class Ready:
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

    def fail(self, code: int, message: str) -> int:
        """Say why the worker gives up (stderr, and the parent); the exit code."""
        print(f"titan-worker: {message}", file=sys.stderr)
        self.send(event="error", code=code, message=message)
        return code


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


class _StoppedStarting(BaseException):
    """SIGTERM or SIGINT while the service file loads: nothing to drain yet."""


def _stop_loading(signum: int, _frame: object) -> None:
    raise _StoppedStarting(signum)


def _stopped_starting(ready: Ready, signum: int) -> int:
    """A worker stopped before it served: it had nothing to drain, so it exits 0 at once."""
    return ready.fail(EXIT_OK, f"stopped by {signal.Signals(signum).name} while starting, before serving")


async def _serve(worker: Worker, ready: Ready, banner: tuple[str, str] | None, early: list[int]) -> None:
    """Serve until a signal, then drain. A signal before the worker serves (noted in ``early`` before
    the loop ran, or received while it connects and runs init()) stops it at once: there is nothing
    to drain, and init() may take minutes."""
    serving = False
    async with anyio.create_task_group() as tg:

        async def watch_signals(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                task_status.started()
                async for signum in signals:
                    if not serving:
                        early.append(signum)
                        tg.cancel_scope.cancel()
                        return
                    if worker.stopping:
                        logger.warning("second signal: stopping without waiting for calls in flight")
                        tg.cancel_scope.cancel()
                    logger.info("received %s", signal.Signals(signum).name)
                    worker.stop()

        await tg.start(watch_signals)
        if early:
            tg.cancel_scope.cancel()
            return

        async def serve_then_stop(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            await worker.run(task_status=task_status)
            tg.cancel_scope.cancel()  # drained: only the signal watcher is left

        await tg.start(serve_then_stop)
        serving = True
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


def serve_file(
    file: str,
    *,
    url: str,
    namespace: str,
    options: WorkerOptions,
    dependencies: dict[str, Any],
    ready: Ready,
    name: str | None = None,
    worker_id: str | None = None,
    verbose: int = 0,
) -> int:
    """Load ``file``'s service and serve it until SIGTERM, then drain; the exit code."""
    # From here a signal is the worker's to handle, not a death by signal: while the file loads (its
    # imports may take long) it stops the load; once the event loop runs, its receiver takes over.
    signals = (signal.SIGTERM, signal.SIGINT)
    early: list[int] = []
    for signum in signals:
        signal.signal(signum, _stop_loading)
    try:
        definition = load_service_file(file)
        worker = Worker(definition, url=url, namespace=namespace, options=options,
                        dependencies=dependencies, service_name=name, worker_id=worker_id)  # fmt: skip
        for signum in signals:  # noted until the event loop's receiver takes over
            signal.signal(signum, lambda signum, _frame: early.append(signum))
    except ServiceFileError as exc:
        cause = exc.__cause__
        if cause is not None and verbose:  # an import that failed, maybe deep in the service's own modules
            sys.stderr.write("".join(traceback.format_exception(cause)))
        hint = " (run with -v for its traceback)" if cause is not None and not verbose else ""
        return ready.fail(EXIT_BAD_FILE, f"{exc}{hint}")
    except (ConfigError, TypeError) as exc:
        return ready.fail(EXIT_USAGE, str(exc))
    except _StoppedStarting as stop:
        return _stopped_starting(ready, stop.args[0])
    banner = None if ready.fd is not None else (url, namespace)  # a manager reports itself
    try:
        # uvloop, when installed (the extra titan-broker[uvloop]), runs the worker's event loop.
        uvloop = importlib.util.find_spec("uvloop") is not None
        anyio.run(_serve, worker, ready, banner, early, backend_options={"use_uvloop": uvloop})
    except Exception as group:
        error = _leaf(group)
        if is_denied(error):  # the worker's ACL user lacks a permission: say which, not a traceback
            user = url_user(url)
            error = access_denied(error, f"serve {worker.service!r}", who=Acting("worker", user))
        if isinstance(error, RedisUnavailable):
            return ready.fail(EXIT_REDIS, str(error))
        if isinstance(error, ConfigError):  # found on connecting: a TLS file that cannot be read
            return ready.fail(EXIT_USAGE, str(error))
        if isinstance(error, rexc.ConnectionError | rexc.TimeoutError):
            # Redis went away after the worker connected (while it registered, say): the same exit.
            return ready.fail(EXIT_REDIS, f"lost Redis at {redact(url)}: {type(error).__name__}: {error}")
        if isinstance(error, InitError):
            return ready.fail(EXIT_INIT, f"{file}: {error}")
        logger.error("worker crashed", exc_info=error)
        return ready.fail(EXIT_CRASH, f"crashed: {type(error).__name__}: {error}")
    if early:
        return _stopped_starting(ready, early[0])
    exit_past_abandoned_threads()
    return EXIT_OK


def exit_past_abandoned_threads() -> None:
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


# The options a manager passes, each with a value. Read by hand rather than with argparse, which
# (with gettext) would add a few milliseconds and a third of a MiB to every worker for five options.
_OPTIONS = ("--worker-id", "--ready-fd", "--parent-pid", "--options-json", "--name")
_USAGE = "usage: python -m titan_worker.start FILE [--worker-id ID] [--ready-fd FD] [--parent-pid PID] " \
    "[--options-json JSON] [--name NAME]"  # fmt: skip


def parse_args(argv: list[str]) -> tuple[str, dict[str, str]]:
    """The service file and the options (``--opt value`` or ``--opt=value``); ConfigError says what is
    wrong."""
    file: str | None = None
    options: dict[str, str] = {}
    rest = iter(argv)
    for arg in rest:
        if not arg.startswith("--"):
            if file is not None:
                raise ConfigError(f"one service file only: got {file!r} and {arg!r}")
            file = arg
            continue
        name, has_value, value = arg.partition("=")
        if name not in _OPTIONS:
            raise ConfigError(f"unknown option {name} (options: {', '.join(_OPTIONS)})")
        if not has_value:
            following = next(rest, None)
            if following is None:
                raise ConfigError(f"{name} needs a value")
            value = following
        options[name] = value
    if file is None:
        raise ConfigError("the service FILE is missing")
    return file, options


def _number(options: dict[str, str], name: str) -> int | None:
    if name not in options:
        return None
    try:
        return int(options[name])
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {options[name]!r}") from None


def main(argv: list[str] | None = None) -> int:
    """The entry point of a spawned worker; the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"{_USAGE}\n\n{__doc__}")
        return EXIT_OK
    try:
        file, args = parse_args(argv)
        ready = Ready(_number(args, "--ready-fd"))
    except ConfigError as exc:
        print(f"{_USAGE}\ntitan-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure(0, "text")
    try:
        parent_pid = _number(args, "--parent-pid")
        options_json = args.get("--options-json")
        options = WorkerOptions(**json.loads(options_json)) if options_json else WorkerOptions()
        options = replace(options, parent_pid=parent_pid)
        url, namespace = resolve_url(None), resolve_namespace(None)
        dependencies = dependencies_from_env()
    except (ConfigError, TypeError, json.JSONDecodeError) as exc:
        return ready.fail(EXIT_USAGE, str(exc))
    return serve_file(file, url=url, namespace=namespace, options=options, dependencies=dependencies,
                      ready=ready, name=args.get("--name"), worker_id=args.get("--worker-id"))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
