"""Operations: liveness, readiness (the database answers) and Prometheus metrics."""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from routes.common import JSON

log = logging.getLogger(__name__)


async def healthz(request: Request) -> JSON:
    """The process is up."""
    return JSON({"status": "ok"})


async def readyz(request: Request) -> JSON:
    """The database is reachable: 200, else 503 (so a load balancer stops sending traffic)."""
    try:
        await request.state.storage.ping()
    except Exception as exc:  # any failure to reach the database means "not ready"
        log.warning("readiness check failed: %s", type(exc).__name__)
        return JSON(
            {"success": False, "error": "Database unreachable", "code": "database_unavailable"},
            status_code=503,
        )
    return JSON({"status": "ready"})


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return PlainTextResponse(generate_latest(request.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
