"""Typed rows the stores return for reads: the database's columns, snake_case, never the API's JSON.

The wire format is built from these by the response structs in ``schema/`` (``rename="camel"``).
Times are milliseconds since the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ConversationRow:
    """One row of messenger_conversations."""

    id: int
    page_id: str
    facebook_conversation_id: str | None
    sender_id: str
    sender_name: str | None
    last_message: str | None
    last_message_time: int | None  # None when no message is stored yet (the column holds 0)
    message_count: int
    unread_count: int
    version: int
    created_at: int
    updated_at: int


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of contact_interaction_events, its payload decoded."""

    id: int
    conversation_id: int
    page_id: str
    event_type: str
    message_id: str | None
    event_timestamp: int
    content: str | None
    payload: dict[str, Any]
    created_at: int


@dataclass(frozen=True, slots=True)
class ActiveSyncRow:
    """A live sync lock of one of the user's pages (the seed's active_syncs view)."""

    page_id: str
    facebook_page_id: str
    locked_by: str
    locked_at: int
    expires_at: int
    fencing_token: int
    sync_session_id: str | None
    total_synced: int | None


@dataclass(frozen=True, slots=True)
class SyncStatisticsRow:
    """Per page counts and the state of its last sync session (the seed's sync_statistics view)."""

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


@dataclass(frozen=True, slots=True)
class InboxRow:
    """A webhook_events row claimed for applying: its raw body as received."""

    id: int
    body: bytes
    received_at: int
