"""Operations: liveness, readiness (the database answers) and Prometheus metrics (core/metrics.py:
summed over every worker when PROMETHEUS_MULTIPROC_DIR is set)."""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from core.errors import DatabaseUnavailable
from routes.common import JSON, services
from schema.responses import Health, error_body

log = logging.getLogger(__name__)


async def healthz(request: Request) -> JSON:
    """The process is up."""
    return JSON(Health(status="ok"))


async def readyz(request: Request) -> JSON:
    """The database is reachable: 200, else 503 (so a load balancer stops sending traffic)."""
    try:
        await services(request).storage.ping()
    except DatabaseUnavailable as exc:  # the engine has logged the outage already
        return JSON(error_body(exc.message, exc.code), status_code=exc.status_code)
    except Exception as exc:  # any other failure to reach the database also means "not ready"
        log.warning("readiness check failed: %s", type(exc).__name__)
        return JSON(error_body("Database unreachable", DatabaseUnavailable.code), status_code=503)
    return JSON(Health(status="ready"))


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return PlainTextResponse(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
