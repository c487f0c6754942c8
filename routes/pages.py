"""POST /api/pages and GET /api/pages: a user registers the Pages it syncs.

A registration (the first and every later one) stores nothing until Graph's ``/me`` says the token
is the Page's own (sync/page_token.py): a token of another Page, or a user's, is 403.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.routing import Route

from core.errors import ServiceError
from routes.auth import require_user
from routes.common import JSON, read_json
from schema.api import RegisterPage
from sync.page_token import verify_page_token

log = logging.getLogger(__name__)


async def register_page(request: Request) -> JSON:
    """Create the page (201) or, for a facebookPageId the user has, update its token (200).

    The token is verified first; a refusal (403, 400, 502) leaves the database as it was.
    """
    user = await require_user(request)
    body = await read_json(request, RegisterPage)
    try:
        identity = await verify_page_token(request.state.http, body.facebook_page_id, body.access_token)
    except ServiceError as exc:
        # The message is Graph's with the token redacted; the id passed RegisterPage's pattern.
        log.warning("page %s not registered for user %s: %s", body.facebook_page_id, user, exc.message)
        raise
    name = body.name if body.name is not None else identity.name
    page, created = await request.state.storage.register_page(
        user, body.facebook_page_id, body.access_token, name
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
