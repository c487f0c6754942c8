"""The Pages a user syncs, each with its sync status.

POST   /api/pages             register (201) or update the token of (200) a page; verified first
GET    /api/pages             {"pages": [Page]}
GET    /api/pages/{pageId}    one Page (404 for another user's or an unknown id)
DELETE /api/pages/{pageId}    the page, its conversations, events and sync state (204); its inbox
                              rows stay until retention removes them

A registration (the first and every later one) stores nothing until Graph's ``/me`` says the token
is the Page's own (sync/page_token.py): a token of another Page, or a user's, is 403. A new page
(or one registered again after its token was refused) wakes this process's scheduler, so its
backfill starts at once.

A Page's ``sync`` object comes from sync/status.py. ``nextRun`` assumes a scheduler runs somewhere
whenever SYNC_INTERVAL_SECONDS > 0: an API-only replica (BACKGROUND_WORK=off) cannot tell whether a
worker runs, and a deployment that has API replicas has a worker (``python app.py worker``).
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import NotFound, ServiceError
from core.services import Services
from routes.auth import require_user
from routes.common import JSON, check_id, read_json, services
from schema.api import RegisterPage
from schema.responses import PageBody, PageList, PageSyncBody, SyncProgressBody
from storage.base import PageSyncFacts
from sync.page_token import verify_page_token
from sync.status import PENDING_GRACE_MS, build_status, syncs_scheduled

log = logging.getLogger(__name__)


def page_body(facts: PageSyncFacts, scheduled: bool) -> PageBody:
    """The public view of a page (never its token) with its sync status."""
    status = build_status(facts, scheduler_enabled=scheduled)
    progress = None
    if facts.session_id is not None:
        progress = SyncProgressBody(
            session_id=facts.session_id, synced=facts.total_synced, complete=bool(facts.is_complete)
        )
    page = facts.page
    return PageBody(
        page_id=page.id,
        facebook_page_id=page.facebook_page_id,
        name=page.name,
        token_status=page.token_status,
        created_at=page.created_at,
        updated_at=page.updated_at,
        sync=PageSyncBody(
            phase=status.phase,
            until=status.until,
            conversations=facts.conversations,
            running=status.syncing,
            progress=progress,
            last_complete_sync=status.last_complete_sync_at,
            next_run=status.next_run_at,
            last_error=status.last_error,
        ),
    )


async def page_bodies(found: Services, user: str, page_id: str | None = None) -> list[PageBody]:
    """The user's pages (or the one page) as the API shows them."""
    settings = found.settings
    facts = await found.storage.page_sync_facts(
        user, page_id, int(settings.sync_interval_seconds * 1000), PENDING_GRACE_MS
    )
    scheduled = syncs_scheduled(settings)
    return [page_body(f, scheduled) for f in facts]


async def register_page(request: Request) -> JSON:
    """Create the page (201) or, for a facebookPageId the user has, update its token (200).

    The token is verified first; a refusal (403, 400, 502) leaves the database as it was.
    """
    user = await require_user(request)
    body = await read_json(request, RegisterPage)
    found = services(request)
    try:
        identity = await verify_page_token(found.http, body.facebook_page_id, body.access_token)
    except ServiceError as exc:
        # The message is Graph's with the token redacted; the id passed RegisterPage's pattern.
        log.warning("page %s not registered for user %s: %s", body.facebook_page_id, user, exc.message)
        raise
    name = body.name if body.name is not None else identity.name
    page, created = await found.storage.register_page(user, body.facebook_page_id, body.access_token, name)
    log.info("page %s %s for user %s", page.id, "registered" if created else "updated", user)
    found.scheduler.notify()  # a new page is backfilled at once; a new token resumes a paused one
    (shown,) = await page_bodies(found, user, page.id)
    return JSON(shown, status_code=201 if created else 200)


async def list_pages(request: Request) -> JSON:
    """The user's pages (never their tokens), each with its sync status."""
    user = await require_user(request)
    return JSON(PageList(pages=await page_bodies(services(request), user)))


async def get_page(request: Request) -> JSON:
    """One of the user's pages with its sync status; 404 for any other id."""
    user = await require_user(request)
    page_id = check_id(request.path_params["page_id"], "pageId")
    shown = await page_bodies(services(request), user, page_id)
    if not shown:
        raise NotFound("Page not found")
    return JSON(shown[0])


async def delete_page(request: Request) -> Response:
    """Delete one of the user's pages and everything synced for it (a sync running now stops)."""
    user = await require_user(request)
    page_id = check_id(request.path_params["page_id"], "pageId")
    if not await services(request).storage.delete_page(user, page_id):
        raise NotFound("Page not found")
    log.info("page %s deleted by user %s", page_id, user)
    return Response(status_code=204)


routes = [
    Route("/api/pages", register_page, methods=["POST"]),
    Route("/api/pages", list_pages, methods=["GET"]),
    Route("/api/pages/{page_id}", get_page, methods=["GET"]),
    Route("/api/pages/{page_id}", delete_page, methods=["DELETE"]),
]
