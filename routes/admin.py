"""Who the key is, a page's activity, and the operator views of the webhook inbox.

GET  /api/me                         {"user", "admin"}: the dashboard shows operator views to admins
GET  /api/pages/{pageId}/activity    events stored per minute for the page, last `minutes` (default 60)
GET  /api/admin/inbox                the inbox's health: rows by status, oldest pending, recent errors
POST /api/admin/inbox/replay         failed and invalid rows back to pending; the applier takes them

The admin views need a key listed in ADMIN_KEYS (routes/auth.py), since the inbox holds every
tenant's bodies; they never show a body, only statuses, times and error messages.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.routing import Route

from core.errors import NotFound
from routes.auth import is_admin, require_admin, require_user
from routes.common import JSON, query_int, services
from schema.responses import InboxError, InboxHealth, Me, MinuteEvents, PageActivity, Replayed

log = logging.getLogger(__name__)

RECENT_ERRORS = 20
MAX_ACTIVITY_MINUTES = 24 * 60
REPLAY_STATUSES = ("failed", "invalid")


async def me(request: Request) -> JSON:
    """The key's user, and whether the key is an admin key."""
    user = await require_user(request)
    return JSON(Me(user=user, admin=await is_admin(request)))


async def page_activity(request: Request) -> JSON:
    """Events per minute for one of the user's pages (404 for another user's or an unknown page)."""
    user = await require_user(request)
    minutes = query_int(request, "minutes", 60, 1, MAX_ACTIVITY_MINUTES)
    storage = services(request).storage
    page_id = request.path_params["page_id"]
    if await storage.get_page(user, page_id) is None:
        raise NotFound("Page not found")
    counts = await storage.events_per_minute(page_id, minutes)
    return JSON(PageActivity(per_minute=[MinuteEvents(minute=c.minute, events=c.events) for c in counts]))


async def inbox_health(request: Request) -> JSON:
    """Inbox rows by status, the oldest pending arrival and the last failed/invalid rows."""
    await require_admin(request)
    storage = services(request).storage
    counts = await storage.webhook_status_counts()
    errors = await storage.recent_webhook_errors(RECENT_ERRORS)
    return JSON(
        InboxHealth(
            pending=counts.get("pending", 0),
            applied=counts.get("applied", 0),
            ignored=counts.get("ignored", 0),
            failed=counts.get("failed", 0),
            invalid=counts.get("invalid", 0),
            oldest_pending_at=await storage.oldest_pending_webhook_at(),
            recent_errors=[
                InboxError(id=e.id, status=e.status, error=e.error, received_at=e.received_at) for e in errors
            ],
        )
    )


async def replay_inbox(request: Request) -> JSON:
    """Put failed and invalid rows back to pending and wake this process's applier.

    Where this process runs no applier (BACKGROUND_WORK=off), a worker's applier finds the rows
    on its next poll.
    """
    user = await require_admin(request)
    found = services(request)
    requeued = await found.storage.requeue_webhooks(list(REPLAY_STATUSES))
    log.info("inbox replay by %s: %d rows back to pending", user, requeued)
    if requeued:
        found.applier.notify()  # a no-op where this process runs no applier
    return JSON(Replayed(requeued=requeued))


routes = [
    Route("/api/me", me, methods=["GET"]),
    Route("/api/pages/{page_id}/activity", page_activity, methods=["GET"]),
    Route("/api/admin/inbox", inbox_health, methods=["GET"]),
    Route("/api/admin/inbox/replay", replay_inbox, methods=["POST"]),
]
