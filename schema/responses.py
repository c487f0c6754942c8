"""Response bodies of the HTTP API: one msgspec Struct per body the service sends.

The routes build these from the typed rows storage returns (``storage/rows.py``, ``storage.base.Page``)
and from the sync engine's ``SyncResult`` (schema/ imports neither); the JSON is camelCase
(``rename="camel"``). The OpenAPI document (``routes/docs.py``) is drawn from these same structs,
so what it says is what is sent.

Times are milliseconds since the epoch. A field typed ``X | UnsetType`` is left out of the body
when unset (an error's ``expiresAt`` is sent only by the errors that carry one).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

Phase = Literal["backfilling", "idle", "paused_token_invalid", "rate_limited", "error"]


class Base(msgspec.Struct, rename="camel"):
    """camelCase on the wire, snake_case in the code."""


# ---- errors ------------------------------------------------------------------------------------


class ErrorBody(Base, kw_only=True):
    """Every error the API answers: ``{"success": false, "error", "code", ...}`` (SPEC)."""

    success: bool = False
    error: str
    code: str
    expires_at: int | None | UnsetType = UNSET  # 409 sync_in_progress: when the holder's lease ends
    retry_after: int | float | None | UnsetType = UNSET  # 502 graph_*: seconds until a retry may work
    limit: int | UnsetType = UNSET  # 429 too_many_streams: the streams allowed per key
    request_id: str | UnsetType = UNSET  # 500 internal_error: the id to find in the logs


# The keyword arguments ServiceErrors carry (core/errors.py ``extra``), by their wire name.
_ERROR_EXTRAS = {
    "expiresAt": "expires_at",
    "retryAfter": "retry_after",
    "limit": "limit",
    "requestId": "request_id",
}


def error_body(message: str, code: str, extra: dict[str, Any] | None = None) -> ErrorBody:
    """The error body of a ServiceError's message, code and extras (unknown extras are a bug: KeyError)."""
    fields = {_ERROR_EXTRAS[name]: value for name, value in (extra or {}).items()}
    return ErrorBody(error=message, code=code, **fields)


# ---- pages -------------------------------------------------------------------------------------


class SyncProgressBody(Base):
    """The page's current (or last) sync session."""

    session_id: str
    synced: int
    complete: bool


class PageSyncBody(Base):
    """A page's sync status, from the scheduler's point of view (API.md, SPEC semantics 12)."""

    phase: Phase
    until: int | None  # rate_limited: the regain time; error: the backoff's next try
    conversations: int  # stored for this page
    running: bool  # a sync (scheduled or manual, any replica) holds the page's lease now
    progress: SyncProgressBody | None
    last_complete_sync: int | None
    next_run: int | None
    last_error: str | None


class PageBody(Base):
    """A registered page (never its token), with its sync status."""

    page_id: str
    facebook_page_id: str
    name: str | None
    token_status: str
    created_at: int
    updated_at: int
    sync: PageSyncBody


class PageList(Base):
    """GET /api/pages."""

    pages: list[PageBody]


# ---- conversations and events ----------------------------------------------------------------


class ConversationBody(Base):
    """One contact's conversation on a page."""

    id: int
    page_id: str
    facebook_conversation_id: str | None
    sender_id: str
    sender_name: str | None
    last_message: str | None
    last_message_time: int | None
    message_count: int
    unread_count: int
    version: int
    created_at: int
    updated_at: int


class ConversationList(Base):
    """GET /api/conversations: newest first; ``nextCursor`` is opaque (null on the last page)."""

    conversations: list[ConversationBody]
    next_cursor: str | None


class EventBody(Base):
    """One stored interaction (also each Server-Sent Event's ``data``)."""

    id: int
    conversation_id: int
    page_id: str
    event_type: str
    message_id: str | None
    event_timestamp: int
    content: str | None
    payload: dict[str, Any]
    created_at: int


class EventList(Base):
    """GET /api/conversations/{id}/events: newest first."""

    events: list[EventBody]
    next_cursor: str | None


# ---- sync ----------------------------------------------------------------------------------------


class SyncResultBody(Base):
    """POST /api/conversations/sync: what this call did (``resumeSession`` set while ``hasMore``)."""

    success: bool
    synced: int
    inserted: int
    updated: int
    unchanged: int
    skipped: int
    events_inserted: int
    has_more: bool
    resume_session: str | None
    sync_session_id: str
    duration_ms: int


class ActiveSyncBody(Base):
    """A live sync lock of one of the user's pages (the seed's active_syncs)."""

    page_id: str
    facebook_page_id: str
    locked_by: str
    locked_at: int
    expires_at: int
    fencing_token: int
    sync_session_id: str | None
    total_synced: int | None


class ActiveSyncList(Base):
    """GET /api/sync/active."""

    active_syncs: list[ActiveSyncBody]


class SyncStatisticsBody(Base):
    """Per page counts and its last sync session (the seed's sync_statistics)."""

    page_id: str
    facebook_page_id: str
    token_status: str
    conversations: int
    events: int
    sync_session_id: str | None
    is_complete: bool | None
    total_synced: int | None
    completed_syncs: int
    watermark: int | None
    started_at: int | None
    updated_at: int | None
    completed_at: int | None
    last_error: str | None


class SyncStatisticsList(Base):
    """GET /api/sync/stats."""

    statistics: list[SyncStatisticsBody]


class LocksRemoved(Base):
    """POST /api/sync/locks/cleanup."""

    removed: int


# ---- operations, who am I, admin -------------------------------------------------------------


class Health(Base):
    """GET /healthz (``ok``) and GET /readyz (``ready``)."""

    status: str


class Me(Base):
    """GET /api/me."""

    user: str
    admin: bool


class MinuteEvents(Base):
    """Events stored for a page in one minute; `minute` is the minute's start (ms)."""

    minute: int
    events: int


class PageActivity(Base):
    """GET /api/pages/{pageId}/activity: oldest minute first, minutes without events included."""

    per_minute: list[MinuteEvents]


class InboxError(Base):
    """A failed or invalid inbox row: what went wrong, never the body."""

    id: int
    status: str
    error: str | None
    received_at: int


class InboxHealth(Base):
    """GET /api/admin/inbox."""

    pending: int
    applied: int
    ignored: int
    failed: int
    invalid: int
    oldest_pending_at: int | None
    recent_errors: list[InboxError]


class Replayed(Base):
    """POST /api/admin/inbox/replay."""

    requeued: int
