"""GET /: a small live dashboard of the key's pages (static HTML; its script calls the API).

The page itself holds no data and needs no key: the script asks for an API key, keeps it in
the tab's sessionStorage, and sends it as a Bearer header to /api/pages, /api/sync/* and the
event stream, so a key never travels in a URL.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

DASHBOARD = Path(__file__).resolve().parent / "dashboard.html"


async def dashboard(request: Request) -> HTMLResponse:
    """The dashboard page."""
    return HTMLResponse(
        DASHBOARD.read_bytes(),
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; connect-src 'self'",
            "X-Frame-Options": "DENY",
        },
    )


routes = [Route("/", dashboard, methods=["GET"])]
