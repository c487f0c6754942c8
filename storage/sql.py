"""The storage interface written once in SQL, for both engines.

The SQL here is PostgreSQL-flavoured and portable: `$1` placeholders, `now_ms()` for the
database's clock, `FOR UPDATE` where PostgreSQL needs a row lock. Each engine (sqlite.py,
postgres.py) supplies connections that translate what it must, plus two helpers for bulk
statements (`rows` and `any_of`), so no engine test appears outside the engines.
Text from outside written here (Graph's cursors and error messages) loses its U+0000, as the
conversations' text does in `storage/conversations.py` (SPEC semantics 11).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from core.errors import LeaseLost
from core.records import ConversationRecord
from storage.activity import ActivityStorage
from storage.base import (
    Lease,
    Page,
    SyncProgress,
    SyncState,
    WriteCounts,
)
from storage.conversations import (
    CONVERSATION_COLUMNS,
    CONVERSATION_COLUMNS_C,
    MUTABLE,
    without_nul,
    write_records,
)
from storage.engine import Conn, Engine, retry_transient
from storage.inbox import InboxStorage

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _page(row: Any) -> Page:
    return Page(
        id=row["id"],
        user_id=row["user_id"],
        facebook_page_id=row["facebook_page_id"],
        name=row["name"],
        token_status=row["token_status"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        access_token=row["access_token"],
    )


def _lease(row: Any) -> Lease:
    return Lease(
        page_id=row["page_id"],
        locked_by=row["locked_by"],
        fencing_token=row["fencing_token"],
        expires_at=row["expires_at"],
    )


def _sync_state(row: Any) -> SyncState:
    return SyncState(
        page_id=row["page_id"],
        user_id=row["user_id"],
        sync_session_id=row["sync_session_id"],
        mode=row["mode"],
        last_cursor=row["last_cursor"],
        total_synced=row["total_synced"],
        is_complete=bool(row["is_complete"]),
        watermark=row["watermark"],
        session_watermark=row["session_watermark"],
        completed_syncs=row["completed_syncs"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        last_error=row["last_error"],
    )


def _conversation_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "pageId": row["page_id"],
        "facebookConversationId": row["facebook_conversation_id"],
        "senderId": row["sender_id"],
        "senderName": row["sender_name"],
        "lastMessage": row["last_message"],
        "lastMessageTime": row["last_message_time"] or None,
        "messageCount": row["message_count"],
        "unreadCount": row["unread_count"],
        "version": row["version"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }


def _event_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "conversationId": row["conversation_id"],
        "pageId": row["page_id"],
        "eventType": row["event_type"],
        "messageId": row["message_id"],
        "eventTimestamp": row["event_timestamp"],
        "content": row["content"],
        "payload": msgspec.json.decode(row["payload"]),
        "createdAt": row["created_at"],
    }


class SQLStorage(InboxStorage, ActivityStorage):
    """`storage.base.Storage` over an engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---- life cycle -------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        applied_now: list[str] = []
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            parts = path.name.split(".")
            if len(parts) == 3 and parts[1] != self.engine.name:
                continue  # the other engine's half of a pair
            name = parts[0]
            async with self.engine.migration_transaction() as conn:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(name TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)"
                )
                if await conn.fetchrow("SELECT 1 FROM schema_migrations WHERE name = $1", name):
                    continue
                await conn.run_script(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES ($1, now_ms())", name
                )
                applied_now.append(name)
        return applied_now

    async def ping(self) -> None:
        async with self.engine.reader() as conn:
            await conn.fetchrow("SELECT 1")

    async def close(self) -> None:
        await self.engine.close()

    # ---- api keys -----------------------------------------------------------------------------

    async def add_api_key(self, user_id: str, key_hash: str) -> None:
        async with self.engine.transaction() as conn:
            await conn.execute("INSERT INTO api_keys (user_id, key_hash) VALUES ($1, $2)", user_id, key_hash)

    async def user_for_key_hash(self, key_hash: str) -> str | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow("SELECT user_id FROM api_keys WHERE key_hash = $1", key_hash)
        return None if row is None else row["user_id"]

    # ---- pages -------------------------------------------------------------------------------

    async def register_page(
        self, user_id: str, facebook_page_id: str, access_token: str, name: str | None
    ) -> tuple[Page, bool]:
        async with self.engine.transaction() as conn:
            row = await conn.fetchrow(
                "INSERT INTO facebook_pages (id, user_id, facebook_page_id, name, access_token) "
                "VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (user_id, facebook_page_id) DO UPDATE SET "
                "access_token = excluded.access_token, "
                "name = COALESCE(excluded.name, facebook_pages.name), "
                "token_status = 'valid', updated_at = now_ms() "
                "RETURNING *, (id = $1) AS created",
                str(uuid.uuid4()),
                user_id,
                facebook_page_id,
                name,
                access_token,
            )
        assert row is not None
        return _page(row), bool(row["created"])

    async def list_pages(self, user_id: str) -> list[Page]:
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT * FROM facebook_pages WHERE user_id = $1 ORDER BY created_at, id", user_id
            )
        return [_page(r) for r in rows]

    async def get_page(self, user_id: str, page_id: str) -> Page | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM facebook_pages WHERE id = $1 AND user_id = $2", page_id, user_id
            )
        return None if row is None else _page(row)

    async def find_page(self, page_id: str) -> Page | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow("SELECT * FROM facebook_pages WHERE id = $1", page_id)
        return None if row is None else _page(row)

    async def mark_token_invalid(self, page_id: str) -> None:
        async with self.engine.transaction() as conn:
            await conn.execute(
                "UPDATE facebook_pages SET token_status = 'invalid', updated_at = now_ms() WHERE id = $1",
                page_id,
            )

    # ---- sync locks ------------------------------------------------------------------------------

    async def acquire_sync_lock(self, page_id: str, locked_by: str, ttl_seconds: float) -> Lease | None:
        # One statement, judged by the database's clock. The row stays after release and
        # cleanup, so the token only grows.
        async with self.engine.transaction() as conn:
            row = await conn.fetchrow(
                "INSERT INTO sync_locks (page_id, locked_by, locked_at, expires_at, fencing_token) "
                "VALUES ($1, $2, now_ms(), now_ms() + $3, 1) "
                "ON CONFLICT (page_id) DO UPDATE SET locked_by = excluded.locked_by, "
                "locked_at = excluded.locked_at, expires_at = excluded.expires_at, "
                "fencing_token = sync_locks.fencing_token + 1 "
                "WHERE sync_locks.locked_by IS NULL OR sync_locks.expires_at <= now_ms() "
                "RETURNING page_id, locked_by, fencing_token, expires_at",
                page_id,
                locked_by,
                int(ttl_seconds * 1000),
            )
        return None if row is None else _lease(row)

    async def extend_sync_lock(self, lease: Lease, ttl_seconds: float) -> Lease | None:
        async with self.engine.transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE sync_locks SET expires_at = now_ms() + $3 "
                "WHERE page_id = $1 AND fencing_token = $2 AND locked_by IS NOT NULL "
                "RETURNING page_id, locked_by, fencing_token, expires_at",
                lease.page_id,
                lease.fencing_token,
                int(ttl_seconds * 1000),
            )
        return None if row is None else _lease(row)

    async def release_sync_lock(self, lease: Lease) -> bool:
        async with self.engine.transaction() as conn:
            n = await conn.execute(
                "UPDATE sync_locks SET locked_by = NULL, expires_at = NULL "
                "WHERE page_id = $1 AND fencing_token = $2 AND locked_by IS NOT NULL",
                lease.page_id,
                lease.fencing_token,
            )
        return n == 1

    async def current_lock(self, page_id: str) -> Lease | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow(
                "SELECT page_id, locked_by, fencing_token, expires_at FROM sync_locks "
                "WHERE page_id = $1 AND locked_by IS NOT NULL AND expires_at > now_ms()",
                page_id,
            )
        return None if row is None else _lease(row)

    async def cleanup_expired_locks(self) -> int:
        async with self.engine.transaction() as conn:
            return await conn.execute(
                "UPDATE sync_locks SET locked_by = NULL, expires_at = NULL "
                "WHERE locked_by IS NOT NULL AND expires_at <= now_ms()"
            )

    # ---- sync state ----------------------------------------------------------------------------

    async def get_sync_state(self, page_id: str) -> SyncState | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow("SELECT * FROM sync_state WHERE page_id = $1", page_id)
        return None if row is None else _sync_state(row)

    @staticmethod
    async def _hold_lease(conn: Conn, lease: Lease) -> None:
        """Lock the lease's row for this transaction, or raise LeaseLost if it was taken over.

        On PostgreSQL the row lock makes a takeover wait until this transaction ends, so a
        write checked here cannot interleave with a new holder's.
        """
        row = await conn.fetchrow(
            "SELECT fencing_token FROM sync_locks "
            "WHERE page_id = $1 AND fencing_token = $2 AND locked_by IS NOT NULL FOR UPDATE",
            lease.page_id,
            lease.fencing_token,
        )
        if row is None:
            raise LeaseLost("The sync lock was taken over by another sync; this one stopped")

    async def start_sync_session(self, lease: Lease, user_id: str, session_id: str, mode: str) -> SyncState:
        async with self.engine.transaction() as conn:
            await self._hold_lease(conn, lease)
            row = await conn.fetchrow(
                "INSERT INTO sync_state (page_id, user_id, sync_session_id, mode, last_cursor, "
                "total_synced, is_complete, session_watermark, started_at, updated_at, last_error) "
                "VALUES ($1, $2, $3, $4, NULL, 0, FALSE, NULL, now_ms(), now_ms(), NULL) "
                "ON CONFLICT (page_id) DO UPDATE SET user_id = excluded.user_id, "
                "sync_session_id = excluded.sync_session_id, mode = excluded.mode, "
                "last_cursor = NULL, total_synced = 0, is_complete = FALSE, "
                "session_watermark = NULL, started_at = excluded.started_at, "
                "updated_at = excluded.updated_at, last_error = NULL "
                "RETURNING *",
                lease.page_id,
                user_id,
                session_id,
                mode,
            )
        assert row is not None
        return _sync_state(row)

    @staticmethod
    async def _write_progress(conn: Conn, lease: Lease, progress: SyncProgress) -> SyncState:
        # A complete session moves the watermark to the newest conversation it saw.
        row = await conn.fetchrow(
            "UPDATE sync_state SET last_cursor = $2, total_synced = total_synced + $3, "
            "session_watermark = COALESCE($4, session_watermark), is_complete = $5, "
            "last_error = $6, updated_at = now_ms(), "
            "watermark = CASE WHEN $5 THEN COALESCE($4, session_watermark, watermark) "
            "ELSE watermark END, "
            "completed_syncs = completed_syncs + CASE WHEN $5 THEN 1 ELSE 0 END, "
            "completed_at = CASE WHEN $5 THEN now_ms() ELSE completed_at END "
            "WHERE page_id = $1 RETURNING *",
            lease.page_id,
            # Graph's cursors and error messages are text from outside: no U+0000 (semantics 11).
            without_nul(progress.last_cursor),
            progress.synced,
            progress.session_watermark,
            progress.is_complete,
            without_nul(progress.last_error),
        )
        if row is None:
            raise LeaseLost("The sync session is gone; start a new one")
        return _sync_state(row)

    async def save_sync_progress(self, lease: Lease, progress: SyncProgress) -> SyncState:
        async with self.engine.transaction() as conn:
            await self._hold_lease(conn, lease)
            return await self._write_progress(conn, lease, progress)

    @retry_transient
    async def save_conversation_page(
        self, lease: Lease, records: Sequence[ConversationRecord], progress: SyncProgress
    ) -> WriteCounts:
        async with self.engine.transaction() as conn:
            await self._hold_lease(conn, lease)
            counts = await self._write_records(conn, lease.page_id, records, expect_new=True)
            await self._write_progress(conn, lease, progress)
        return counts

    # ---- conversations -------------------------------------------------------------------------

    @retry_transient
    async def write_conversations(self, page_id: str, records: Sequence[ConversationRecord]) -> WriteCounts:
        async with self.engine.transaction() as conn:
            return await self._write_records(conn, page_id, records)

    async def _write_records(
        self, conn: Conn, page_id: str, records: Sequence[ConversationRecord], *, expect_new: bool = False
    ) -> WriteCounts:
        """`conversations.write_records` (a method, so a test can inject a failure into it)."""
        return await write_records(conn, page_id, records, expect_new=expect_new)

    async def update_conversation(
        self, conversation_id: int, expected_version: int, changes: dict[str, Any]
    ) -> bool:
        unknown = set(changes) - set(MUTABLE)
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        names = list(changes)
        sets = ", ".join(f"{name} = ${i + 3}" for i, name in enumerate(names))
        async with self.engine.transaction() as conn:
            n = await conn.execute(
                f"UPDATE messenger_conversations SET {sets}, version = version + 1, "
                "updated_at = now_ms() WHERE id = $1 AND version = $2",
                conversation_id,
                expected_version,
                *(without_nul(v) if isinstance(v, str) else v for v in changes.values()),
            )
        return n == 1

    async def get_conversation(self, user_id: str, conversation_id: int) -> dict[str, Any] | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow(
                f"SELECT {CONVERSATION_COLUMNS_C} "
                "FROM messenger_conversations c JOIN facebook_pages p ON p.id = c.page_id "
                "WHERE c.id = $1 AND p.user_id = $2",
                conversation_id,
                user_id,
            )
        return None if row is None else _conversation_json(row)

    async def list_conversations(
        self, page_id: str, limit: int, after: tuple[int, int] | None
    ) -> list[dict[str, Any]]:
        keyset = "AND (last_message_time, id) < ($3, $4) " if after else ""
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                f"SELECT {CONVERSATION_COLUMNS} FROM messenger_conversations "
                f"WHERE page_id = $1 {keyset}ORDER BY last_message_time DESC, id DESC LIMIT $2",
                page_id,
                limit,
                *(after or ()),
            )
        return [_conversation_json(r) for r in rows]

    async def list_events(
        self, conversation_id: int, limit: int, after: tuple[int, int] | None
    ) -> list[dict[str, Any]]:
        keyset = "AND (event_timestamp, id) < ($3, $4) " if after else ""
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT id, conversation_id, page_id, event_type, message_id, event_timestamp, "
                "content, payload, created_at FROM contact_interaction_events "
                f"WHERE conversation_id = $1 {keyset}"
                "ORDER BY event_timestamp DESC, id DESC LIMIT $2",
                conversation_id,
                limit,
                *(after or ()),
            )
        return [_event_json(r) for r in rows]

    # ---- monitoring --------------------------------------------------------------------------

    async def active_syncs(self, user_id: str) -> list[dict[str, Any]]:
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT * FROM active_syncs WHERE user_id = $1 ORDER BY locked_at", user_id
            )
        return [
            {
                "pageId": r["page_id"],
                "facebookPageId": r["facebook_page_id"],
                "lockedBy": r["locked_by"],
                "lockedAt": r["locked_at"],
                "expiresAt": r["expires_at"],
                "fencingToken": r["fencing_token"],
                "syncSessionId": r["sync_session_id"],
                "totalSynced": r["total_synced"],
            }
            for r in rows
        ]

    async def sync_statistics(self, user_id: str) -> list[dict[str, Any]]:
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT * FROM sync_statistics WHERE user_id = $1 ORDER BY page_id", user_id
            )
        return [
            {
                "pageId": r["page_id"],
                "facebookPageId": r["facebook_page_id"],
                "tokenStatus": r["token_status"],
                "conversations": r["conversations"],
                "events": r["events"],
                "syncSessionId": r["sync_session_id"],
                "isComplete": None if r["is_complete"] is None else bool(r["is_complete"]),
                "totalSynced": r["total_synced"],
                "completedSyncs": r["completed_syncs"] or 0,
                "watermark": r["watermark"],
                "startedAt": r["started_at"],
                "updatedAt": r["updated_at"],
                "completedAt": r["completed_at"],
                "lastError": r["last_error"],
            }
            for r in rows
        ]

    # ---- event stream --------------------------------------------------------------------------

    async def last_event_id(self, page_id: str) -> int:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow(
                "SELECT COALESCE(MAX(id), 0) AS last FROM contact_interaction_events WHERE page_id = $1",
                page_id,
            )
        return int(row["last"]) if row is not None else 0

    async def events_after(
        self, page_id: str, after_id: int, limit: int, until_id: int | None = None
    ) -> list[dict[str, Any]]:
        upper = "AND id <= $4 " if until_id is not None else ""
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT id, conversation_id, page_id, event_type, message_id, event_timestamp, "
                "content, payload, created_at FROM contact_interaction_events "
                f"WHERE page_id = $1 AND id > $2 {upper}ORDER BY id LIMIT $3",
                page_id,
                after_id,
                limit,
                *(() if until_id is None else (until_id,)),
            )
        return [_event_json(r) for r in rows]
