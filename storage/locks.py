"""Sync locks (leases with fencing tokens) and sync state: what makes a sync resumable and safe.

A mixin of `SQLStorage` (the same engine). A lease is taken in one statement judged by the
database's clock; every write a sync makes carries its lease and is refused (`LeaseLost`) once
another holder took the lock over, because the lease's row is locked for the write's transaction
(`hold_lease`). The lock's row stays after release and cleanup, so a page's token only grows.
Graph's cursors and error messages are text from outside: written without U+0000 (semantics 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.errors import LeaseLost
from core.records import ConversationRecord
from storage.base import Lease, SyncProgress, SyncState, WriteCounts
from storage.conversations import without_nul, write_records
from storage.engine import Conn, Store


def lease_row(row: Any) -> Lease:
    """A sync_locks row as the stores return it."""
    return Lease(
        page_id=row["page_id"],
        locked_by=row["locked_by"],
        fencing_token=row["fencing_token"],
        expires_at=row["expires_at"],
    )


def sync_state_row(row: Any) -> SyncState:
    """A sync_state row as the stores return it."""
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


async def hold_lease(conn: Conn, lease: Lease) -> None:
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


async def write_progress(conn: Conn, lease: Lease, progress: SyncProgress) -> SyncState:
    """Write a sync's progress; a complete session moves the watermark to the newest conversation."""
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
        without_nul(progress.last_cursor),
        progress.synced,
        progress.session_watermark,
        progress.is_complete,
        without_nul(progress.last_error),
    )
    if row is None:
        raise LeaseLost("The sync session is gone; start a new one")
    return sync_state_row(row)


_LEASE_COLUMNS = "page_id, locked_by, fencing_token, expires_at"


class LockStorage(Store):
    """The sync locks and sync state of `storage.base.Storage`."""

    # ---- sync locks ------------------------------------------------------------------------------

    async def acquire_sync_lock(self, page_id: str, locked_by: str, ttl_seconds: float) -> Lease | None:
        async def acquire(conn: Conn) -> Any:
            return await conn.fetchrow(
                "INSERT INTO sync_locks (page_id, locked_by, locked_at, expires_at, fencing_token) "
                "VALUES ($1, $2, now_ms(), now_ms() + $3, 1) "
                # The clock is read again once the row is ours: a statement that waited for the
                # row lock would otherwise get a lease shortened by the wait (or already expired).
                "ON CONFLICT (page_id) DO UPDATE SET locked_by = excluded.locked_by, "
                "locked_at = now_ms(), expires_at = now_ms() + $3, "
                "fencing_token = sync_locks.fencing_token + 1 "
                "WHERE sync_locks.locked_by IS NULL OR sync_locks.expires_at <= now_ms() "
                f"RETURNING {_LEASE_COLUMNS}",
                page_id,
                locked_by,
                int(ttl_seconds * 1000),
            )

        row = await self._interaction("acquire_sync_lock", acquire)
        return None if row is None else lease_row(row)

    async def extend_sync_lock(self, lease: Lease, ttl_seconds: float) -> Lease | None:
        async def extend(conn: Conn) -> Any:
            return await conn.fetchrow(
                "UPDATE sync_locks SET expires_at = now_ms() + $3 "
                "WHERE page_id = $1 AND fencing_token = $2 AND locked_by IS NOT NULL "
                f"RETURNING {_LEASE_COLUMNS}",
                lease.page_id,
                lease.fencing_token,
                int(ttl_seconds * 1000),
            )

        row = await self._interaction("extend_sync_lock", extend)
        return None if row is None else lease_row(row)

    async def release_sync_lock(self, lease: Lease) -> bool:
        async def release(conn: Conn) -> int:
            return await conn.execute(
                "UPDATE sync_locks SET locked_by = NULL, expires_at = NULL "
                "WHERE page_id = $1 AND fencing_token = $2 AND locked_by IS NOT NULL",
                lease.page_id,
                lease.fencing_token,
            )

        return await self._interaction("release_sync_lock", release) == 1

    async def current_lock(self, page_id: str) -> Lease | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow(
                f"SELECT {_LEASE_COLUMNS} FROM sync_locks "
                "WHERE page_id = $1 AND locked_by IS NOT NULL AND expires_at > now_ms()",
                page_id,
            )
        return None if row is None else lease_row(row)

    async def cleanup_expired_locks(self) -> int:
        async def cleanup(conn: Conn) -> int:
            return await conn.execute(
                "UPDATE sync_locks SET locked_by = NULL, expires_at = NULL "
                "WHERE locked_by IS NOT NULL AND expires_at <= now_ms()"
            )

        return await self._interaction("cleanup_expired_locks", cleanup)

    # ---- sync state ----------------------------------------------------------------------------

    async def get_sync_state(self, page_id: str) -> SyncState | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow("SELECT * FROM sync_state WHERE page_id = $1", page_id)
        return None if row is None else sync_state_row(row)

    async def start_sync_session(self, lease: Lease, user_id: str, session_id: str, mode: str) -> SyncState:
        async def start(conn: Conn) -> Any:
            await hold_lease(conn, lease)
            return await conn.fetchrow(
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

        row = await self._interaction("start_sync_session", start)
        assert row is not None
        return sync_state_row(row)

    async def save_sync_progress(self, lease: Lease, progress: SyncProgress) -> SyncState:
        async def save(conn: Conn) -> SyncState:
            await hold_lease(conn, lease)
            return await write_progress(conn, lease, progress)

        return await self._interaction("save_sync_progress", save)

    async def save_conversation_page(
        self, lease: Lease, records: Sequence[ConversationRecord], progress: SyncProgress
    ) -> WriteCounts:
        async def save(conn: Conn) -> WriteCounts:
            await hold_lease(conn, lease)
            # A sync page brings mostly contacts not stored yet: insert first, look after.
            counts = await write_records(conn, lease.page_id, records, expect_new=True)
            await write_progress(conn, lease, progress)
            return counts

        return await self._interaction("save_conversation_page", save)
