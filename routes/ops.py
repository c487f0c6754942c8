"""Operations: liveness, readiness (the database answers) and Prometheus metrics."""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from core.errors import DatabaseUnavailable
from routes.common import JSON

log = logging.getLogger(__name__)


async def healthz(request: Request) -> JSON:
    """The process is up."""
    return JSON({"status": "ok"})


async def readyz(request: Request) -> JSON:
    """The database is reachable: 200, else 503 (so a load balancer stops sending traffic)."""
    try:
        await request.state.storage.ping()
    except DatabaseUnavailable as exc:  # the engine has logged the outage already
        return JSON(exc.to_json(), status_code=exc.status_code)
    except Exception as exc:  # any other failure to reach the database also means "not ready"
        log.warning("readiness check failed: %s", type(exc).__name__)
        error = DatabaseUnavailable("Database unreachable")
        return JSON(error.to_json(), status_code=error.status_code)
    return JSON({"status": "ready"})


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return PlainTextResponse(generate_latest(request.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
