"""GET /: the dashboard, and /static/*: its script and style sheet, all from routes/static/.

The page holds no data and needs no key: its script (static/dashboard.js) asks for an API key,
keeps it in the tab's sessionStorage and sends it as a Bearer header to the API, so a key never
travels in a URL. Customers write the texts and names it shows, so the script writes every
stored value as text, and the Content-Security-Policy below allows no inline script, no inline
style and no other origin: were some value ever written as HTML, nothing in it could run.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent / "static"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (ETag): after an upgrade the browser takes the new script at once.
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """routes/static/, with the dashboard's security headers on every file."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(SECURITY_HEADERS)
        return response


async def dashboard(request: Request) -> Response:
    """The dashboard page (static HTML; static/dashboard.js does the rest)."""
    return Response(
        (STATIC / "dashboard.html").read_bytes(),
        media_type="text/html; charset=utf-8",
        headers=SECURITY_HEADERS,
    )


routes = [
    Route("/", dashboard, methods=["GET"]),
    Mount("/static", app=DashboardFiles(directory=STATIC), name="static"),
]
