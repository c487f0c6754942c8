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
from routes.common import JSON, check_id, read_json, services
from schema.api import SyncRequest
from schema.responses import (
    ActiveSyncBody,
    ActiveSyncList,
    LocksRemoved,
    SyncResultBody,
    SyncStatisticsBody,
    SyncStatisticsList,
)
from storage.rows import ActiveSyncRow, SyncStatisticsRow
from sync.engine import SyncResult


def sync_result_body(result: SyncResult) -> SyncResultBody:
    """The SPEC's response body of one sync call."""
    return SyncResultBody(
        success=True,
        synced=result.synced,
        inserted=result.inserted,
        updated=result.updated,
        unchanged=result.unchanged,
        skipped=result.skipped,
        events_inserted=result.events_inserted,
        has_more=result.has_more,
        resume_session=result.resume_session,
        sync_session_id=result.session_id,
        duration_ms=result.duration_ms,
    )


def active_sync_body(row: ActiveSyncRow) -> ActiveSyncBody:
    """The wire form of an active_syncs row."""
    return ActiveSyncBody(
        page_id=row.page_id,
        facebook_page_id=row.facebook_page_id,
        locked_by=row.locked_by,
        locked_at=row.locked_at,
        expires_at=row.expires_at,
        fencing_token=row.fencing_token,
        sync_session_id=row.sync_session_id,
        total_synced=row.total_synced,
    )


def statistics_body(row: SyncStatisticsRow) -> SyncStatisticsBody:
    """The wire form of a sync_statistics row."""
    return SyncStatisticsBody(
        page_id=row.page_id,
        facebook_page_id=row.facebook_page_id,
        token_status=row.token_status,
        conversations=row.conversations,
        events=row.events,
        sync_session_id=row.sync_session_id,
        is_complete=row.is_complete,
        total_synced=row.total_synced,
        completed_syncs=row.completed_syncs,
        watermark=row.watermark,
        started_at=row.started_at,
        updated_at=row.updated_at,
        completed_at=row.completed_at,
        last_error=row.last_error,
    )


async def sync_conversations(request: Request) -> JSON:
    """Run or continue the page's sync within its time budget (see sync/engine.py)."""
    user = await require_user(request)
    body = await read_json(request, SyncRequest)
    check_id(body.page_id, "pageId")
    check_id(body.facebook_page_id, "facebookPageId")
    if body.resume_session is not None:
        check_id(body.resume_session, "resumeSession")
    return JSON(sync_result_body(await services(request).sync.sync(user, body)))


async def active_syncs(request: Request) -> JSON:
    """The user's pages whose sync lock is live."""
    user = await require_user(request)
    rows = await services(request).storage.active_syncs(user)
    return JSON(ActiveSyncList(active_syncs=[active_sync_body(r) for r in rows]))


async def sync_stats(request: Request) -> JSON:
    """Per page conversation and event counts, and the state of the last sync session."""
    user = await require_user(request)
    rows = await services(request).storage.sync_statistics(user)
    return JSON(SyncStatisticsList(statistics=[statistics_body(r) for r in rows]))


async def cleanup_locks(request: Request) -> JSON:
    """Clear expired leases (any user's: an expired lease protects nothing); fencing tokens stay."""
    await require_user(request)
    return JSON(LocksRemoved(removed=await services(request).storage.cleanup_expired_locks()))


routes = [
    Route("/api/conversations/sync", sync_conversations, methods=["POST"]),
    Route("/api/conversations/sync-fixed", sync_conversations, methods=["POST"]),
    Route("/api/sync/active", active_syncs, methods=["GET"]),
    Route("/api/sync/stats", sync_stats, methods=["GET"]),
    Route("/api/sync/locks/cleanup", cleanup_locks, methods=["POST"]),
]
