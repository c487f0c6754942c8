"""The Messenger Sync Service: the ASGI app (`uvicorn app:app`) and its command line (`python app.py`).

uvicorn app:app --http h11 --h11-max-incomplete-event-size 65536 --timeout-graceful-shutdown 5
    the service (configuration from the environment / .env; the flags are routes.limits.SERVER_FLAGS:
    the header limit and the shutdown deadline); `python app.py serve` runs the same
python app.py COMMAND
    serve, worker, status, sync PAGE_ID, replay-webhooks, migrate, api-keys create|list|revoke,
    create-api-key USER: see core/cli.py

create_app(settings) builds the app; its lifespan opens what core.services.running_services
provides (storage, the Graph client through the rate-limit pool, the sync engine, the inbox writer,
the applier, the scheduler) as one typed `Services`, which handlers read with
routes.common.services(request).
"""

from __future__ import annotations

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
from core.logging import bind_request_id, configure_logging, request_id_var
from core.metrics import Metrics
from core.services import running_services
from core.settings import ConfigError, Settings
from routes import admin, conversations, dashboard, docs, ops, pages, stream, sync, webhook
from routes.common import JSON
from routes.limits import HTTPLimits
from schema.responses import ErrorBody, error_body

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
        token = bind_request_id(request_id)  # every log line of this request carries it
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
            request_id_var.reset(token)


async def service_error(request: Request, exc: Exception) -> JSON:
    """Our own errors: their status and the SPEC's JSON shape."""
    assert isinstance(exc, ServiceError)
    return JSON(error_body(exc.message, exc.code, exc.extra), status_code=exc.status_code)


async def http_error(request: Request, exc: Exception) -> JSON:
    """Starlette's 404/405/...: the same JSON shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSON(ErrorBody(error=str(exc.detail), code=code), status_code=exc.status_code, headers=exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> JSON:
    """Anything else: logged with the request id, answered 500 without internals."""
    request_id = getattr(request.state, "request_id", "-")
    log.exception("unhandled error in %s %s [request %s]", request.method, request.url.path, request_id)
    return JSON(
        ErrorBody(error="Internal server error", code="internal_error", request_id=request_id),
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
        try:
            async with running_services(
                settings, metrics=metrics, graph_transport=graph_transport
            ) as services:
                yield {"services": services}
        finally:
            metrics.close()

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
            *docs.routes,
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


# --- `uvicorn app:app` and `python app.py` -------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The command line: core/cli.py."""
    from core.cli import main as cli_main

    return cli_main(argv)


def _module_app() -> Starlette:
    """The app `uvicorn app:app` serves: settings from the environment, logging configured once."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:  # bad configuration: one line, not a traceback
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    # uvicorn configured its loggers before importing us: hand them to our handler and format.
    configure_logging(settings.log_format)
    return create_app(settings)


if __name__ == "__main__":
    sys.exit(main())

app = _module_app()
