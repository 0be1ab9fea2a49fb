"""``titan dashboard``: a live web page of a namespace, read from Redis alone (see docs/dashboard.md).

The web parts (Starlette, uvicorn, sse-starlette) come with the extra
``titan-broker[dashboard]`` and are imported only when the command runs, so
the rest of the CLI works without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from typing import Annotated

import typer

from titan_broker._config import ENV_NAMESPACE, ENV_URL, resolve_namespace, resolve_url
from titan_broker._errors import ConfigError

from ..common import EXIT_USAGE, app, err, out

ENV_TOKEN = "TITAN_DASHBOARD_TOKEN"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@app.command("dashboard")
def dashboard_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free one).")] = 8000,
    redis: Annotated[
        str | None,
        typer.Option("--redis", envvar=ENV_URL, help="Redis URL (one node, a cluster or Sentinel)."),
    ] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", envvar=ENV_NAMESPACE, help="Key namespace.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=ENV_TOKEN,
            show_envvar=True,
            help="Allow the actions (replay, purge, cancel) to whoever gives this token; without it the page "
            "is read-only.",
        ),
    ] = None,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between two reads of Redis.")] = 1.0,
) -> None:
    """Serve a live web page of every service, worker, job and schedule; print its address."""
    try:
        import uvicorn

        from .monitor import Monitor
        from .server import create_app
    except ImportError as exc:
        err.print(
            f"[red]error:[/] titan dashboard needs its extra ({exc.name} is missing): "
            "pip install 'titan-broker[dashboard]'",
            highlight=False,
        )
        raise typer.Exit(EXIT_USAGE) from None
    settings = ctx.obj
    url = redis or getattr(settings, "url", None)
    namespace = namespace or getattr(settings, "namespace", None)
    if not 0.1 <= interval <= 60:
        err.print("[red]error:[/] --interval must be from 0.1 to 60 seconds", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    try:
        url = resolve_url(url)
        namespace = resolve_namespace(namespace)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    token = token or None
    if token is None and host not in LOOPBACK:
        err.print(
            f"[yellow]warning:[/] listening on {host} without a token: anyone who reaches it reads every "
            "service's state (the actions stay off); give --token, or bind to 127.0.0.1",
            highlight=False,
        )
    try:
        sock = _listen(host, port)
    except OSError as exc:
        err.print(f"[red]error:[/] cannot listen on {host}:{port}: {exc.strerror or exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    secrets = tuple(s for s in (token, *_passwords(url)) if s)
    monitor = Monitor(url, namespace, interval=interval, secrets=secrets)
    monitor.actions = token is not None
    shown_host = f"[{host}]" if ":" in host else host
    address = f"http://{shown_host}:{sock.getsockname()[1]}/"
    out.print(
        f"titan dashboard: {address} (namespace {namespace}, "
        f"Redis {monitor.shown_url}, actions {'on: token required' if token else 'off'})",
        highlight=False,
        soft_wrap=True,
    )
    sys.stdout.flush()
    web = create_app(monitor, token, loopback=host in LOOPBACK)
    config = uvicorn.Config(
        web, log_level="warning", access_log=False, timeout_graceful_shutdown=2, lifespan="off"
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        reader = asyncio.create_task(monitor.run())
        try:
            await server.serve(sockets=[sock])
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _passwords(url: str) -> list[str]:
    """Every password in a Redis URL (userinfo, ``password=`` and ``*_password=`` parameters)."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    base, _, query = url.partition("?")
    found = [v for k, v in parse_qsl(query) if k.lower().endswith("password")]
    userinfo, at, _ = urlsplit(base).netloc.rpartition("@")
    if at and ":" in userinfo:
        password = userinfo.split(":", 1)[1]
        found += [password, unquote(password)]
    return found
