"""What the API reads: conversations and events (keyset pages, newest first), the event stream,
and the seed's monitoring views. Typed rows (`storage/rows.py`), never the API's JSON.

A mixin of `SQLStorage` (the same engine); reads only, each on a reader connection.
"""

from __future__ import annotations

from typing import Any

import msgspec

from storage.conversations import CONVERSATION_COLUMNS, CONVERSATION_COLUMNS_C
from storage.engine import Engine
from storage.rows import ActiveSyncRow, ConversationRow, EventRow, SyncStatisticsRow

EVENT_COLUMNS = (
    "id, conversation_id, page_id, event_type, message_id, event_timestamp, content, payload, created_at"
)

_decode_payload = msgspec.json.Decoder().decode


def conversation_row(row: Any) -> ConversationRow:
    """A messenger_conversations row as the stores return it."""
    return ConversationRow(
        id=row["id"],
        page_id=row["page_id"],
        facebook_conversation_id=row["facebook_conversation_id"],
        sender_id=row["sender_id"],
        sender_name=row["sender_name"],
        last_message=row["last_message"],
        # The column holds 0 until a message is stored; a row says "none" instead.
        last_message_time=row["last_message_time"] or None,
        message_count=row["message_count"],
        unread_count=row["unread_count"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def event_row(row: Any) -> EventRow:
    """A contact_interaction_events row, its payload decoded (jsonb arrives as text on both engines)."""
    return EventRow(
        id=row["id"],
        conversation_id=row["conversation_id"],
        page_id=row["page_id"],
        event_type=row["event_type"],
        message_id=row["message_id"],
        event_timestamp=row["event_timestamp"],
        content=row["content"],
        payload=_decode_payload(row["payload"]),
        created_at=row["created_at"],
    )


class ReadStorage:
    """The reads of `storage.base.Storage` the API serves."""

    engine: Engine

    # ---- conversations and events ---------------------------------------------------------------

    async def get_conversation(self, user_id: str, conversation_id: int) -> ConversationRow | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow(
                f"SELECT {CONVERSATION_COLUMNS_C} "
                "FROM messenger_conversations c JOIN facebook_pages p ON p.id = c.page_id "
                "WHERE c.id = $1 AND p.user_id = $2",
                conversation_id,
                user_id,
            )
        return None if row is None else conversation_row(row)

    async def list_conversations(
        self, page_id: str, limit: int, after: tuple[int, int] | None
    ) -> list[ConversationRow]:
        keyset = "AND (last_message_time, id) < ($3, $4) " if after else ""
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                f"SELECT {CONVERSATION_COLUMNS} FROM messenger_conversations "
                f"WHERE page_id = $1 {keyset}ORDER BY last_message_time DESC, id DESC LIMIT $2",
                page_id,
                limit,
                *(after or ()),
            )
        return [conversation_row(r) for r in rows]

    async def list_events(
        self, conversation_id: int, limit: int, after: tuple[int, int] | None
    ) -> list[EventRow]:
        keyset = "AND (event_timestamp, id) < ($3, $4) " if after else ""
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                f"SELECT {EVENT_COLUMNS} FROM contact_interaction_events "
                f"WHERE conversation_id = $1 {keyset}"
                "ORDER BY event_timestamp DESC, id DESC LIMIT $2",
                conversation_id,
                limit,
                *(after or ()),
            )
        return [event_row(r) for r in rows]

    # ---- the event stream -------------------------------------------------------------------------

    async def last_event_id(self, page_id: str) -> int:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow(
                "SELECT COALESCE(MAX(id), 0) AS last FROM contact_interaction_events WHERE page_id = $1",
                page_id,
            )
        return int(row["last"]) if row is not None else 0

    async def events_after(
        self, page_id: str, after_id: int, limit: int, until_id: int | None = None
    ) -> list[EventRow]:
        upper = "AND id <= $4 " if until_id is not None else ""
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                f"SELECT {EVENT_COLUMNS} FROM contact_interaction_events "
                f"WHERE page_id = $1 AND id > $2 {upper}ORDER BY id LIMIT $3",
                page_id,
                after_id,
                limit,
                *(() if until_id is None else (until_id,)),
            )
        return [event_row(r) for r in rows]

    # ---- monitoring (the seed's views) ------------------------------------------------------------

    async def active_syncs(self, user_id: str) -> list[ActiveSyncRow]:
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT * FROM active_syncs WHERE user_id = $1 ORDER BY locked_at", user_id
            )
        return [
            ActiveSyncRow(
                page_id=r["page_id"],
                facebook_page_id=r["facebook_page_id"],
                locked_by=r["locked_by"],
                locked_at=r["locked_at"],
                expires_at=r["expires_at"],
                fencing_token=r["fencing_token"],
                sync_session_id=r["sync_session_id"],
                total_synced=r["total_synced"],
            )
            for r in rows
        ]

    async def sync_statistics(self, user_id: str) -> list[SyncStatisticsRow]:
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT * FROM sync_statistics WHERE user_id = $1 ORDER BY page_id", user_id
            )
        return [
            SyncStatisticsRow(
                page_id=r["page_id"],
                facebook_page_id=r["facebook_page_id"],
                token_status=r["token_status"],
                conversations=r["conversations"],
                events=r["events"],
                sync_session_id=r["sync_session_id"],
                # SQLite has no boolean type; NULL: the page never synced.
                is_complete=None if r["is_complete"] is None else bool(r["is_complete"]),
                total_synced=r["total_synced"],
                completed_syncs=r["completed_syncs"] or 0,
                watermark=r["watermark"],
                started_at=r["started_at"],
                updated_at=r["updated_at"],
                completed_at=r["completed_at"],
                last_error=r["last_error"],
            )
            for r in rows
        ]
