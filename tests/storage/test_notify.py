"""Wake-ups after commits: this process' subscribers on both engines, and on PostgreSQL every
replica's, through NOTIFY and LISTEN on the direct connection (DATABASE_DIRECT_URL: a replica
configured with one both listens and notifies). Polling stays the fallback, so these tests assert
delivery, never a latency."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest

from core.metrics import Metrics
from core.records import ConversationRecord, EventRecord
from routes.stream import event_stream
from storage import Storage, open_storage
from storage.base import InboxBody
from tests.helpers import make_settings, running_app
from tests.helpers.storage import write_conversations
from tests.helpers.webhook import PAGE, message_body, signed
from webhook.applier import Applier

# Long enough for a loaded machine; a wake-up that comes at all comes within milliseconds.
DELIVERY_SECONDS = 15.0


async def eventually(check: Callable[[], Awaitable[bool]], step: float = 0.02) -> None:
    """Wait until `check()` holds (at most DELIVERY_SECONDS)."""
    for _ in range(int(DELIVERY_SECONDS / step)):
        if await check():
            return
        await asyncio.sleep(step)
    raise AssertionError("did not happen in time")


def record(mid: str) -> ConversationRecord:
    event = EventRecord(event_type="message_received", message_id=mid, event_timestamp=1_000, content="hi")
    return ConversationRecord(sender_id="7712345678901234", events=[event])


def inbox_body(raw: bytes, status: str = "pending") -> InboxBody:
    return InboxBody(raw, hashlib.sha256(raw).hexdigest(), status=status)


@asynccontextmanager
async def replica(db_url: str, direct_url: str | None = None) -> AsyncIterator[Storage]:
    """Another storage on the same database, as another replica would open it."""
    storage = await open_storage(db_url, direct_url=direct_url)
    try:
        listener = getattr(storage.engine, "listener", None)  # type: ignore[attr-defined]
        if direct_url is not None:
            await asyncio.wait_for(listener.connected.wait(), DELIVERY_SECONDS)
        yield storage
    finally:
        await storage.close()


async def test_a_commit_wakes_this_process_subscribers(storage: Storage) -> None:
    mine, _ = await storage.register_page("alice", "104325188712345", "EAAB-token", None)
    other, _ = await storage.register_page("alice", "104325188799999", "EAAB-token", None)
    with storage.subscribe_events(mine.id) as events, storage.subscribe_events(other.id) as others:
        with storage.subscribe_inbox() as inbox:
            await write_conversations(storage, mine.id, [record("m_1")])
            assert await events.wait(DELIVERY_SECONDS)
            await storage.record_webhook_batch([inbox_body(b'{"object": "page"}')])
            assert await inbox.wait(DELIVERY_SECONDS)
            # Nothing for the other page; a write that stores no new event wakes nobody.
            await write_conversations(storage, mine.id, [record("m_1")])
            await storage.record_webhook_batch([inbox_body(b"not json", status="invalid")])
            assert not events.event.is_set() and not others.event.is_set() and not inbox.event.is_set()


async def test_a_closed_subscription_is_not_woken(storage: Storage) -> None:
    page, _ = await storage.register_page("alice", "104325188712345", "EAAB-token", None)
    subscription = storage.subscribe_events(page.id)
    subscription.close()
    await write_conversations(storage, page.id, [record("m_1")])
    assert not subscription.event.is_set()


@pytest.mark.postgres_only
async def test_another_replicas_commits_wake_subscribers_through_listen(
    storage: Storage, db_url: str, direct_db_url: str
) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", None)
    async with replica(db_url, direct_db_url) as listening, replica(db_url, direct_db_url) as writing:
        assert listening.engine.notifier.shared  # type: ignore[attr-defined]
        with listening.subscribe_events(page.id) as events, listening.subscribe_inbox() as inbox:
            # `writing` writes through `db_url` (a pooler, in tests/pgbouncer.sh): NOTIFY is sent in
            # its write transactions, and heard on `listening`'s direct connection.
            await write_conversations(writing, page.id, [record("m_1")])
            assert await events.wait(DELIVERY_SECONDS)
            await writing.record_webhook_batch([inbox_body(message_body("m_2", "hello", 2_000))])
            assert await inbox.wait(DELIVERY_SECONDS)


@pytest.mark.postgres_only
async def test_without_a_direct_connection_nothing_listens_or_notifies(storage: Storage) -> None:
    """Nobody would hear it: a notifying transaction costs every write (its notifications are
    queued, and committed, even with no listener), so a replica without one does not notify."""
    engine = storage.engine  # type: ignore[attr-defined]
    assert engine.listener is None and not engine.notifier.shared and not engine.notify_others


@pytest.mark.postgres_only
async def test_the_listener_comes_back_after_losing_its_session(
    storage: Storage, db_url: str, direct_db_url: str
) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", None)
    async with replica(db_url, direct_db_url) as listening, replica(db_url, direct_db_url) as writing:
        listener = listening.engine.listener  # type: ignore[attr-defined]
        with listening.subscribe_events(page.id) as events:
            pid = listener.server_pid
            admin = await asyncpg.connect(direct_db_url)
            try:
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            finally:
                await admin.close()
            # Back on a new session: every subscriber is woken once, for what it may have missed...
            assert await events.wait(DELIVERY_SECONDS)

            async def reconnected() -> bool:
                return listener.server_pid not in (None, pid) and listener.connected.is_set()

            await eventually(reconnected)
            events.event.clear()
            # ... and commits wake it again.
            await write_conversations(writing, page.id, [record("m_1")])
            assert await events.wait(DELIVERY_SECONDS)


@pytest.mark.postgres_only
async def test_an_applier_applies_what_another_replica_received_without_polling(
    storage: Storage, db_url: str, direct_db_url: str
) -> None:
    """The intake of one replica commits a body; the applier of another wakes on its NOTIFY
    (its polling is an hour away) and applies it."""
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", None)
    settings = make_settings(db_url, applier_poll_seconds=3600.0)
    async with replica(db_url, direct_db_url) as worker, replica(db_url, direct_db_url) as intake:
        applier = Applier(worker, settings, Metrics())
        await applier.start()
        try:
            # The first may be found by the applier's start-up pass; once it is applied the applier
            # waits for a wake-up, so only the NOTIFY can bring it the second.
            for n, text in enumerate(("first", "hello"), start=1):
                body = message_body(f"m_{n}", text, 1_732_900_000_000 + n)
                await intake.record_webhook_batch([inbox_body(body)])

                async def applied(n: int = n) -> bool:
                    return await storage.webhook_status_counts() == {"applied": n}

                await eventually(applied)
        finally:
            await applier.stop()
    (conversation,) = await storage.list_conversations(page.id, 10, None)
    assert conversation.last_message == "hello"


@pytest.mark.postgres_only
async def test_an_event_stream_on_one_replica_sends_what_another_wrote(
    storage: Storage, db_url: str, direct_db_url: str
) -> None:
    """The SSE stream waits on `subscribe_events`: with its poll an hour away, only the NOTIFY of
    the other replica's commit can bring the event."""
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", None)
    async with replica(db_url, direct_db_url) as serving, replica(db_url, direct_db_url) as writing:
        stream = event_stream(serving, page.id, 0, poll_seconds=3600.0)
        assert await anext(stream) == b"retry: 2000\n\n"
        first = asyncio.ensure_future(anext(stream))  # reads the (empty) page, then waits
        await asyncio.sleep(0.05)
        assert not first.done()
        await write_conversations(writing, page.id, [record("m_live")])
        message = await asyncio.wait_for(first, DELIVERY_SECONDS)
        await stream.aclose()
    assert b'"messageId":"m_live"' in message


@pytest.mark.postgres_only
async def test_a_webhook_received_by_an_api_replica_is_applied_by_the_worker(
    storage: Storage, db_url: str, direct_db_url: str
) -> None:
    """Two apps on one database, both with DATABASE_DIRECT_URL: an API replica without an applier
    receives the webhooks; the worker (polling an hour away) applies each on the NOTIFY."""
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", None)
    api = make_settings(db_url, database_direct_url=direct_db_url, run_applier=False)
    worker = make_settings(db_url, database_direct_url=direct_db_url, applier_poll_seconds=3600.0)
    async with running_app(worker), running_app(api) as http:
        # As in the test above: once the first is applied, only a wake-up brings the second.
        for n, text in enumerate(("first", "hello"), start=1):
            body = message_body(f"m_{n}", text, 1_732_900_000_000 + n)
            response = await http.post("/api/webhook", content=body, headers=signed(body))
            assert response.status_code == 200

            async def applied(n: int = n) -> bool:
                return await storage.webhook_status_counts() == {"applied": n}

            await eventually(applied)
    (conversation,) = await storage.list_conversations(page.id, 10, None)
    assert conversation.last_message == "hello"
