"""The Messenger Sync Service: the ASGI app and its command line.

uvicorn app:app --http h11 --h11-max-incomplete-event-size 65536 --timeout-graceful-shutdown 5
                                         serve (configuration from the environment / .env; the
                                         flags are routes.limits.SERVER_FLAGS: the header limit
                                         and the shutdown deadline)
python app.py serve [--host H] [--port P]  the same, with the same options
python app.py migrate                    apply pending migrations
python app.py create-api-key USER        print a new key for USER (stored hashed)
python app.py sync PAGE_ID               sync a page from the terminal until it is done
python app.py replay-webhooks            apply failed and invalid inbox rows again
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import ServiceError
from core.metrics import Metrics
from core.settings import ConfigError, Settings
from routes import admin, auth, conversations, dashboard, ops, pages, stream, sync, webhook
from routes.common import JSON
from routes.limits import SERVER_OPTIONS, HTTPLimits
from routes.stream import StreamSlots
from storage import Storage, open_storage
from sync.engine import SyncEngine
from sync.graph_client import GRAPH_TIMEOUT, GraphClient
from webhook.applier import Applier
from webhook.intake import InboxWriter

log = logging.getLogger("messenger_sync")


class RequestContext:
    """Pure ASGI middleware: a request id, and per-route counts and latency in the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Ids unique per process and across replicas: a random prefix and a counter (cheaper
        # than a uuid per request on the webhook's hot path).
        self._prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count(1)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _metrics_for(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and formats strings: do it once per key
            children = (
                self.metrics.http_requests.labels(method, route, str(status)),
                self.metrics.http_latency.labels(route),
            )
            self._children[key] = children
        return children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"{self._prefix}-{next(self._ids):x}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            count, latency = self._metrics_for(scope["method"], route, status)
            count.inc()
            latency.observe(time.perf_counter() - started)


async def service_error(request: Request, exc: Exception) -> JSON:
    """Our own errors: their status and the SPEC's JSON shape."""
    assert isinstance(exc, ServiceError)
    return JSON(exc.to_json(), status_code=exc.status_code)


async def http_error(request: Request, exc: Exception) -> JSON:
    """Starlette's 404/405/...: the same JSON shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSON(
        {"success": False, "error": str(exc.detail), "code": code},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def unexpected_error(request: Request, exc: Exception) -> JSON:
    """Anything else: logged with the request id, answered 500 without internals."""
    request_id = getattr(request.state, "request_id", "-")
    log.exception("unhandled error in %s %s [request %s]", request.method, request.url.path, request_id)
    return JSON(
        {
            "success": False,
            "error": "Internal server error",
            "code": "internal_error",
            "requestId": request_id,
        },
        status_code=500,
        headers={"x-request-id": request_id},  # this handler answers outside RequestContext
    )


def create_app(
    settings: Settings | None = None, *, graph_transport: httpx.AsyncBaseTransport | None = None
) -> Starlette:
    """Build the app. `graph_transport` lets tests stand in for the Graph API at the httpx layer."""
    settings = settings or Settings.from_env()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        log.info("starting: %s", settings.describe())
        storage = await open_storage(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
        try:
            await storage.migrate()
            async with httpx.AsyncClient(
                base_url=settings.graph_api_url, timeout=GRAPH_TIMEOUT, transport=graph_transport
            ) as http:
                inbox = InboxWriter(storage, settings, metrics)
                applier = Applier(storage, settings, metrics, intake_saturated=inbox.saturated)
                inbox.on_commit = applier.notify
                await inbox.start()
                if settings.applier_enabled:
                    await applier.start()
                sync_engine = SyncEngine(storage, GraphClient(http), settings, metrics)
                try:
                    yield {
                        "settings": settings,
                        "http": http,
                        "storage": storage,
                        "metrics": metrics,
                        "env_keys": auth.hashed_env_keys(settings.api_keys),
                        "sync": sync_engine,
                        "streams": StreamSlots(),
                        "inbox": inbox,
                        "applier": applier,
                    }
                finally:
                    # Before storage closes: running syncs stop and give their locks back, instead
                    # of leaving their pages locked for the lease's whole TTL.
                    await sync_engine.aclose()
                    await applier.stop()
                    await inbox.stop()
        finally:
            await storage.close()

    app = Starlette(
        # The webhook first: it is the hot path, and the router tries routes in order.
        routes=[
            *webhook.routes,
            *ops.routes,
            *pages.routes,
            *conversations.routes,
            *sync.routes,
            *stream.routes,
            *admin.routes,
            *dashboard.routes,
        ],
        exception_handlers={
            ServiceError: service_error,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
        lifespan=lifespan,
    )
    # Outermost first in the request's path: RequestContext (request id, metrics), then the limits.
    app.add_middleware(HTTPLimits, body_timeout_seconds=settings.body_timeout_seconds)
    app.add_middleware(RequestContext, metrics=metrics)
    return app


# --- command line --------------------------------------------------------------------------


async def _with_storage(settings: Settings) -> Storage:
    storage = await open_storage(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    await storage.migrate()
    return storage


async def _migrate(settings: Settings) -> int:
    storage = await open_storage(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        applied = await storage.migrate()
    finally:
        await storage.close()
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


async def _create_api_key(settings: Settings, user: str) -> int:
    storage = await _with_storage(settings)
    try:
        key = auth.new_key()
        await storage.add_api_key(user, auth.hash_key(key))
    finally:
        await storage.close()
    print(key)
    print(f"(API key for {user}; it is stored hashed and will not be shown again)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python app.py", description="Messenger Sync Service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service (uvicorn app:app)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    sub.add_parser("migrate", help="apply pending database migrations")
    key = sub.add_parser("create-api-key", help="create an API key for a user (shown once)")
    key.add_argument("user")
    sync_cmd = sub.add_parser("sync", help="sync a page from the terminal, resuming until done")
    sync_cmd.add_argument("page_id", help="the pageId returned by POST /api/pages")
    sync_cmd.add_argument("--mode", choices=["incremental", "full"], default=None)
    sub.add_parser("replay-webhooks", help="apply failed and invalid inbox rows again")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2

    if args.command == "serve":
        import uvicorn

        uvicorn.run("app:app", host=args.host, port=args.port, proxy_headers=True, **SERVER_OPTIONS)
        return 0
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    if args.command == "create-api-key":
        return asyncio.run(_create_api_key(settings, args.user))
    if args.command == "sync":
        from sync.command import run_sync_command

        return asyncio.run(run_sync_command(settings, args.page_id, args.mode))
    if args.command == "replay-webhooks":
        from webhook.applier import run_replay_command

        return asyncio.run(run_replay_command(settings))
    parser.error(f"unknown command {args.command}")
    return 2


# `uvicorn app:app`: our own INFO lines (sync outcomes, webhook batches) beside uvicorn's.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
try:
    app = create_app()
except ConfigError as exc:  # `uvicorn app:app` with bad configuration: one line, not a traceback
    print(f"configuration error: {exc}", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
