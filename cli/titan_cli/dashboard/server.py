"""The dashboard's web side: the page, its static files, the JSON and event endpoints, the actions.

Read endpoints are open to whoever reaches the address. The actions (replay
or purge dead letters, cancel a job) need the token the dashboard was started
with, in the ``X-Titan-Token`` header; without a token they are refused (403).
A custom header also keeps other sites' pages from posting to them (a
cross-origin request with it needs a preflight this server never grants).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from titan_broker._calling import Client, Job, JobState
from titan_broker._errors import ConfigError, JobNotFound, RedisUnavailable, TitanError
from titan_broker._registry import known_services, list_dead_letters, purge_dead_letters, replay_dead_letters

from ..common import json_default
from .monitor import Monitor

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_HEADER = "x-titan-token"
DEAD_LETTERS_SHOWN = 200
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def create_app(monitor: Monitor, token: str | None, *, loopback: bool = True) -> Starlette:
    """The ASGI app serving ``monitor``'s snapshots; actions allowed with ``token`` only.

    On a loopback address (``loopback``) a request must name a loopback host: a page of another
    site whose name was made to resolve to 127.0.0.1 (DNS rebinding) cannot read the dashboard.
    """

    def reply(value: Any, status: int = 200) -> Response:
        body = json.dumps(monitor.scrub(json.loads(json.dumps(value, default=_json_default))))
        return Response(body, status, media_type="application/json", headers={"Cache-Control": "no-store"})

    def refused(request: Request) -> Response | None:
        if token is None:
            return reply({"error": "actions are off: start the dashboard with --token to allow them"}, 403)
        given = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return reply({"error": "wrong or missing token"}, 403)
        return None

    def connected() -> Client:
        if monitor.client is None:
            raise RedisUnavailable("Redis is unreachable; the dashboard keeps trying")
        return monitor.client

    async def service_named(client: Client, request: Request) -> str:
        service = str(request.path_params["service"])
        if service not in await known_services(client.redis, client.keys):
            raise _NotFound(f"unknown service {service!r}")
        return service

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def info(request: Request) -> Response:
        return reply(
            {"actions": token is not None, "namespace": monitor.namespace, "redis": monitor.shown_url}
        )

    async def snapshot(request: Request) -> Response:
        return Response(
            monitor.snapshot, media_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def history(request: Request) -> Response:
        return reply(monitor.history())

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[dict[str, str]]:
            seen = monitor.refreshes
            yield {"event": "snapshot", "data": monitor.snapshot}
            while True:
                seen = await monitor.wait_change(seen)
                yield {"event": "snapshot", "data": monitor.snapshot}

        return EventSourceResponse(events(), ping=10, headers={"Cache-Control": "no-store"})

    async def auth(request: Request) -> Response:
        return refused(request) or reply({"ok": True})

    async def dead_letters(request: Request) -> Response:
        client = connected()
        service = await service_named(client, request)
        letters = await list_dead_letters(client.redis, client.keys, service, count=DEAD_LETTERS_SHOWN)
        return reply([d.to_dict() for d in letters])

    async def dead_letters_action(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        client = connected()
        service = await service_named(client, request)
        body = await _body(request)
        ids = body.get("ids")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            return reply({"error": "ids must be a list of dead letter ids, or absent for all"}, 400)
        if request.path_params["action"] not in ("replay", "purge"):
            return reply({"error": "no such action: replay or purge"}, 404)
        if request.path_params["action"] == "replay":
            count = await replay_dead_letters(client.redis, client.keys, service, ids)
            return reply({"replayed": count})
        return reply({"purged": await purge_dead_letters(client.redis, client.keys, service, ids)})

    async def job(request: Request) -> Response:
        client = connected()
        found: Job[Any] = client.job(str(request.path_params["job_id"]))
        status = await found.status()
        result = await found.result(timeout=0) if status.state is JobState.DONE else None
        return reply({**status.to_dict(), "service": found.service, "result": result})

    async def cancel(request: Request) -> Response:
        denied = refused(request)
        if denied is not None:
            return denied
        client = connected()
        cancelled = await client.job(str(request.path_params["job_id"])).cancel()
        return reply({"cancelled": cancelled})

    async def titan_error(request: Request, exc: Exception) -> Response:
        status = (
            404 if isinstance(exc, (JobNotFound, _NotFound)) else 400 if isinstance(exc, ConfigError) else 503
        )
        return reply({"error": str(exc)}, status)

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES))] if loopback else []
    return Starlette(
        middleware=middleware,
        routes=[
            Route("/", index),
            Route("/api/info", info),
            Route("/api/snapshot", snapshot),
            Route("/api/history", history),
            Route("/api/stream", stream),
            Route("/api/auth", auth, methods=["POST"]),
            Route("/api/services/{service}/dead-letters", dead_letters),
            Route("/api/services/{service}/dead-letters/{action:str}", dead_letters_action, methods=["POST"]),
            Route("/api/jobs/{job_id:path}/cancel", cancel, methods=["POST"]),
            Route("/api/jobs/{job_id:path}", job),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={TitanError: titan_error, _NotFound: titan_error},
    )


class _NotFound(Exception):
    pass


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _json_default(value: Any) -> Any:
    try:
        return json_default(value)
    except TypeError:
        return repr(value)
