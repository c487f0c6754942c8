"""The storage contract, on both engines: locks, fencing, versions, events, atomicity, and what a
database that cannot be reached looks like (DatabaseUnavailable, then recovery on its own)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from core.errors import DatabaseUnavailable, LeaseLost
from core.records import ConversationRecord, EventRecord
from storage import Storage, open_storage
from storage.base import SyncProgress
from storage.sql import SQLStorage
from storage.sqlite import SQLiteEngine
from tests.helpers import PG_URL
from tests.helpers.proxy import TcpProxy
from tests.helpers.storage import page_ids_of, write_conversations


async def rows(storage: Storage, sql: str, *args: Any) -> list[Any]:
    async with storage.engine.reader() as conn:  # type: ignore[attr-defined]
        return await conn.fetch(sql, *args)


async def new_page(storage: Storage, user: str = "alice", fb_id: str = "104325188712345") -> str:
    page, _ = await storage.register_page(user, fb_id, "EAAB-secret-token", "Page")
    return page.id


def message(mid: str, ts: int, text: str = "hi", kind: str = "message_received") -> EventRecord:
    return EventRecord(event_type=kind, message_id=mid, event_timestamp=ts, content=text)


def conversation(sender: str, *events: EventRecord, **fields: Any) -> ConversationRecord:
    newest = max(events, key=lambda e: e.event_timestamp) if events else None
    fields.setdefault("last_message", newest.content if newest else None)
    fields.setdefault("last_message_time", newest.event_timestamp if newest else None)
    return ConversationRecord(sender_id=sender, events=list(events), **fields)


async def test_fifty_concurrent_acquirers_one_winner(storage: Storage, db_url: str) -> None:
    page_id = await new_page(storage)
    # Three engines on one database stand for three replicas.
    others = [await open_storage(db_url) for _ in range(2)]
    try:
        stores = [storage, *others]
        results = await asyncio.gather(
            *(stores[i % 3].acquire_sync_lock(page_id, f"worker-{i}", 30) for i in range(50))
        )
    finally:
        for other in others:
            await other.close()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert winners[0].fencing_token == 1
    assert (await storage.current_lock(page_id)) == winners[0]


async def test_expired_lease_is_taken_over_and_fenced(storage: Storage) -> None:
    page_id = await new_page(storage)
    old = await storage.acquire_sync_lock(page_id, "old", 0.05)
    assert old is not None
    await storage.start_sync_session(old, "alice", "session-1", "full")
    await asyncio.sleep(0.1)  # let the lease run out on the database's clock
    new = await storage.acquire_sync_lock(page_id, "new", 30)
    assert new is not None and new.fencing_token > old.fencing_token

    with pytest.raises(LeaseLost):
        await storage.save_sync_progress(
            old, SyncProgress(last_cursor="stale", synced=5, session_watermark=None)
        )
    with pytest.raises(LeaseLost):
        await storage.save_conversation_page(
            old, [conversation("7712345678901234", message("m_1", 1000))], SyncProgress("stale", 1, None)
        )
    assert await storage.release_sync_lock(old) is False
    assert await storage.extend_sync_lock(old, 30) is None
    state = await storage.get_sync_state(page_id)
    assert state is not None and state.last_cursor is None and state.total_synced == 0
    assert await rows(storage, "SELECT id FROM messenger_conversations") == []
    # The new holder can write, and release.
    await storage.save_sync_progress(new, SyncProgress(last_cursor="fresh", synced=1, session_watermark=None))
    assert await storage.release_sync_lock(new) is True
    assert await storage.current_lock(page_id) is None


async def test_live_lease_blocks_and_extends(storage: Storage) -> None:
    page_id = await new_page(storage)
    lease = await storage.acquire_sync_lock(page_id, "a", 30)
    assert lease is not None
    assert await storage.acquire_sync_lock(page_id, "b", 30) is None
    extended = await storage.extend_sync_lock(lease, 60)
    assert extended is not None and extended.expires_at >= lease.expires_at
    assert extended.fencing_token == lease.fencing_token


async def test_fencing_token_grows_after_cleanup(storage: Storage) -> None:
    page_id = await new_page(storage)
    tokens = []
    for _ in range(3):
        lease = await storage.acquire_sync_lock(page_id, "w", 0.01)
        assert lease is not None
        tokens.append(lease.fencing_token)
        await asyncio.sleep(0.03)
        assert await storage.cleanup_expired_locks() == 1
        assert await storage.cleanup_expired_locks() == 0
    assert tokens == sorted(set(tokens))
    released = await storage.acquire_sync_lock(page_id, "w", 30)
    assert released is not None and await storage.release_sync_lock(released)
    again = await storage.acquire_sync_lock(page_id, "w", 30)
    assert again is not None and again.fencing_token > released.fencing_token > tokens[-1]


async def test_concurrent_version_checked_updates(storage: Storage, db_url: str) -> None:
    """Writers on two storages (two replicas) change one conversation at once: each update is
    checked against the version it read, the losers re-read and merge again, nothing is lost."""
    page_id = await new_page(storage)
    await write_conversations(storage, page_id, [conversation("7712345678901234", message("m_0", 1000))])
    other = await open_storage(db_url)
    try:
        stores = [storage, other]
        results = await asyncio.gather(
            *(
                write_conversations(
                    stores[i % 2],
                    page_id,
                    [conversation("7712345678901234", message(f"m_{i}", 1000 + i, f"text {i}"))],
                )
                for i in range(1, 11)
            )
        )
    finally:
        await other.close()
    assert [(r.inserted, r.updated, r.events_inserted) for r in results] == [(0, 1, 1)] * 10
    (after,) = await rows(
        storage, "SELECT version, message_count, unread_count, last_message FROM messenger_conversations"
    )
    assert (after["version"], after["message_count"], after["unread_count"]) == (10, 11, 11)
    assert after["last_message"] == "text 10"


async def test_update_that_changes_nothing_keeps_version(storage: Storage) -> None:
    page_id = await new_page(storage)
    record = conversation("7712345678901234", message("m_1", 1000), sender_name="Ann", message_count=1)
    first = await write_conversations(storage, page_id, [record])
    assert (first.inserted, first.events_inserted) == (1, 1)
    again = await write_conversations(storage, page_id, [record])
    assert (again.inserted, again.updated, again.unchanged, again.events_inserted) == (0, 0, 1, 0)
    (row,) = await rows(storage, "SELECT version FROM messenger_conversations")
    assert row["version"] == 0
    newer = conversation("7712345678901234", message("m_2", 2000, "later"), message_count=2)
    changed = await write_conversations(storage, page_id, [newer])
    assert (changed.updated, changed.events_inserted) == (1, 1)
    (row,) = await rows(storage, "SELECT version, last_message FROM messenger_conversations")
    assert (row["version"], row["last_message"]) == (1, "later")


async def test_last_message_never_moves_backwards(storage: Storage) -> None:
    page_id = await new_page(storage)
    await write_conversations(
        storage, page_id, [conversation("7712345678901234", message("m_new", 5000, "new"))]
    )
    late = await write_conversations(
        storage, page_id, [conversation("7712345678901234", message("m_old", 1000, "old"))]
    )
    assert late.events_inserted == 1
    (row,) = await rows(
        storage, "SELECT last_message, last_message_time, message_count FROM messenger_conversations"
    )
    assert (row["last_message"], row["last_message_time"], row["message_count"]) == ("new", 5000, 2)


async def test_same_event_twice_is_one_row(storage: Storage) -> None:
    page_id = await new_page(storage)
    read = EventRecord(event_type="message_read", event_timestamp=3000, payload={"watermark": 3000})
    record = conversation("7712345678901234", message("m_1", 1000), message("m_1", 1000), read)
    await write_conversations(storage, page_id, [record])
    await write_conversations(storage, page_id, [record, record])
    events = await rows(storage, "SELECT event_type, message_id FROM contact_interaction_events ORDER BY id")
    assert [(e["event_type"], e["message_id"]) for e in events] == [
        ("message_received", "m_1"),
        ("message_read", None),
    ]


async def test_conversation_and_events_are_atomic(storage: Storage) -> None:
    page_id = await new_page(storage)
    # The event row violates NOT NULL: the failure comes after the conversation was inserted.
    broken = EventRecord(event_type=None, event_timestamp=1000, message_id="m_x")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="(?i)null"):  # sqlite3.IntegrityError or asyncpg's
        await write_conversations(storage, page_id, [conversation("7712345678901234", broken)])
    assert await rows(storage, "SELECT id FROM messenger_conversations") == []
    assert await rows(storage, "SELECT id FROM contact_interaction_events") == []
    # And the storage is still usable afterwards.
    ok = await write_conversations(storage, page_id, [conversation("7712345678901234", message("m_1", 1))])
    assert ok.inserted == 1


async def test_pages_are_per_user(storage: Storage) -> None:
    page, created = await storage.register_page("alice", "104325188712345", "token-1", "Shop")
    assert created
    same, created_again = await storage.register_page("alice", "104325188712345", "token-2", None)
    assert (same.id, created_again, same.name, same.access_token) == (page.id, False, "Shop", "token-2")
    bobs, _ = await storage.register_page("bob", "104325188712345", "token-3", None)
    assert bobs.id != page.id
    assert await storage.get_page("bob", page.id) is None
    assert await page_ids_of(storage, "alice") == [page.id]
    assert "token-1" not in repr(page) and "token-2" not in repr(same)


# --- an unreachable database ----------------------------------------------------------------


async def _every_kind_of_connection(storage: Storage) -> list[BaseException | None]:
    """A read, a write transaction and a one-statement write: what each raised (None: it worked)."""
    calls = [
        storage.ping(),
        storage.register_page("alice", "104325188799999", "EAAB-token", None),
        storage.cleanup_expired_locks(),
    ]
    outcomes: list[BaseException | None] = []
    for call in calls:
        try:
            await call
        except Exception as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)
    return outcomes


@pytest.mark.postgres_only
async def test_postgres_going_away_and_coming_back(db_url: str) -> None:
    with TcpProxy.for_url(PG_URL) as proxy:
        storage = await open_storage(proxy.url(db_url))
        try:
            await storage.migrate()
            assert await _every_kind_of_connection(storage) == [None, None, None]
            # Gone (the pool's idle connections are reset with it, new ones refused): every kind of
            # connection raises DatabaseUnavailable, and quickly.
            proxy.stop()
            outcomes = await asyncio.wait_for(_every_kind_of_connection(storage), 30)
            assert all(isinstance(exc, DatabaseUnavailable) for exc in outcomes), outcomes
            assert [getattr(exc, "code", None) for exc in outcomes] == ["database_unavailable"] * 3
            # Back: the same storage works again, nothing restarted, not one call failing first.
            proxy.start()
            assert await _every_kind_of_connection(storage) == [None, None, None]
        finally:
            await storage.close()


@pytest.mark.postgres_only
@pytest.mark.skipif(
    os.environ.get("TEST_PG_ISOLATION") == "database",
    reason="behind a transaction pooler the pooler replaces a terminated server session unseen",
)
async def test_postgres_restarting_under_the_pool(db_url: str) -> None:
    """The server terminating our sessions (what a restart or failover does): the pool recovers."""
    name = f"outage_{uuid.uuid4().hex[:8]}"
    storage = await open_storage(f"{db_url}{'&' if '?' in db_url else '?'}application_name={name}")
    try:
        await storage.migrate()
        # A connection in use while its session is terminated: that caller gets a 503.
        with pytest.raises(DatabaseUnavailable):
            async with storage.engine.reader() as conn:  # type: ignore[attr-defined]
                admin = await asyncpg.connect(PG_URL)
                try:
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                        name,
                    )
                finally:
                    await admin.close()
                async with asyncio.timeout(30):
                    await conn.fetchrow("SELECT 1")
        # Unlike the caller that was mid-query when the server went, the next ones just work.
        assert await _every_kind_of_connection(storage) == [None, None, None]
    finally:
        await storage.close()


async def test_sqlite_locked_past_the_busy_timeout(tmp_path: Path) -> None:
    """Another process holding the write lock too long: writes answer DatabaseUnavailable, reads
    go on (WAL), and once the lock is let go the same engine writes again."""
    path = tmp_path / "locked.db"
    storage = SQLStorage(SQLiteEngine(str(path), busy_timeout_ms=50))
    await storage.engine.open()  # type: ignore[attr-defined]
    try:
        await storage.migrate()
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # e.g. a backup, or the sqlite3 shell mid-transaction
            outcomes = await _every_kind_of_connection(storage)
            assert outcomes[0] is None  # readers are not blocked by a writer
            assert all(isinstance(exc, DatabaseUnavailable) for exc in outcomes[1:]), outcomes
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert await _every_kind_of_connection(storage) == [None, None, None]
    finally:
        await storage.close()


async def test_engines_tell_outages_from_bugs(storage: Storage) -> None:
    """A statement that is wrong stays an error of its own (a 500 with a log line), not a 503."""
    engine = storage.engine  # type: ignore[attr-defined]
    with pytest.raises(Exception) as raised:
        async with engine.reader() as conn:
            await conn.fetch("SELECT no_such_column FROM facebook_pages")
    assert not isinstance(raised.value, DatabaseUnavailable)
    assert not engine.is_unavailable(raised.value)
    assert engine.is_unavailable(ConnectionRefusedError(111, "Connection refused"))
