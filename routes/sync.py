"""Conversation sync and its monitoring.

POST /api/conversations/sync         (alias /api/conversations/sync-fixed, the seed's path)
GET  /api/sync/active                the user's live sync locks (the seed's active_syncs)
GET  /api/sync/stats                 per page counts and sync progress (the seed's sync_statistics)
POST /api/sync/locks/cleanup         remove expired leases (the seed's cleanup_expired_locks())
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from routes.auth import require_user
from routes.common import JSON, check_id, read_json
from schema.api import SyncRequest


async def sync_conversations(request: Request) -> JSON:
    """Run or continue the page's sync within its time budget (see sync_engine)."""
    user = await require_user(request)
    body = await read_json(request, SyncRequest)
    check_id(body.page_id, "pageId")
    check_id(body.facebook_page_id, "facebookPageId")
    if body.resume_session is not None:
        check_id(body.resume_session, "resumeSession")
    return JSON(await request.state.sync.sync(user, body))


async def active_syncs(request: Request) -> JSON:
    """The user's pages whose sync lock is live."""
    user = await require_user(request)
    return JSON({"activeSyncs": await request.state.storage.active_syncs(user)})


async def sync_stats(request: Request) -> JSON:
    """Per page conversation and event counts, and the state of the last sync session."""
    user = await require_user(request)
    return JSON({"statistics": await request.state.storage.sync_statistics(user)})


async def cleanup_locks(request: Request) -> JSON:
    """Clear expired leases (any user's: an expired lease protects nothing); fencing tokens stay."""
    await require_user(request)
    return JSON({"removed": await request.state.storage.cleanup_expired_locks()})


routes = [
    Route("/api/conversations/sync", sync_conversations, methods=["POST"]),
    Route("/api/conversations/sync-fixed", sync_conversations, methods=["POST"]),
    Route("/api/sync/active", active_syncs, methods=["GET"]),
    Route("/api/sync/stats", sync_stats, methods=["GET"]),
    Route("/api/sync/locks/cleanup", cleanup_locks, methods=["POST"]),
]
