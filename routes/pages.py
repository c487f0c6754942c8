"""POST /api/pages and GET /api/pages: a user registers the Pages it syncs."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.routing import Route

from routes.auth import require_user
from routes.common import JSON, read_json
from schema.api import RegisterPage

log = logging.getLogger(__name__)


async def register_page(request: Request) -> JSON:
    """Create the page (201) or, for a facebookPageId the user has, update its token (200)."""
    user = await require_user(request)
    body = await read_json(request, RegisterPage)
    page, created = await request.state.storage.register_page(
        user, body.facebook_page_id, body.access_token, body.name
    )
    log.info("page %s %s for user %s", page.id, "registered" if created else "updated", user)
    return JSON(page.to_json(), status_code=201 if created else 200)


async def list_pages(request: Request) -> JSON:
    """The user's pages (never their tokens)."""
    user = await require_user(request)
    pages = await request.state.storage.list_pages(user)
    return JSON({"pages": [p.to_json() for p in pages]})


routes = [
    Route("/api/pages", register_page, methods=["POST"]),
    Route("/api/pages", list_pages, methods=["GET"]),
]
