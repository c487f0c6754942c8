"""Autopilot storage on both engines: inbox retention, deleting a page or a conversation (scoped
by user, nothing of another page touched), when pages are due, the schedule's backoff."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.errors import LeaseLost
from core.records import ConversationRecord, EventRecord
from storage.base import InboxBody, SyncProgress
from tests.helpers.autopilot import Store, contacts_of, open_store
from tests.helpers.storage import execute, schedule_of, write_conversations

FB_A, FB_B = "104325188712345", "104325188799999"
ALICE_CONTACT, OTHER_CONTACT = "7712345678901234", "7798765432109876"
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    opened = await open_store(db_url)
    try:
        yield opened
    finally:
        await opened.close()


async def rows(store: Store, sql: str, *args: Any) -> list[Any]:
    async with store.engine.reader() as conn:
        return list(await conn.fetch(sql, *args))


def message_body(page: str, *contacts: str, mid: str = "m_1") -> bytes:
    """A webhook body with one message from each contact to the page."""
    items = [
        {
            "sender": {"id": contact},
            "recipient": {"id": page},
            "timestamp": 1_732_900_000_000 + i,
            "message": {"mid": f"{mid}_{contact}_{i}", "text": f"hello from {contact}"},
        }
        for i, contact in enumerate(contacts)
    ]
    return json.dumps(
        {"object": "page", "entry": [{"id": page, "time": 1_732_900_000_000, "messaging": items}]}
    ).encode()


async def inbox(store: Store, *bodies: bytes, status: str = "pending") -> list[int]:
    await store.record_webhook_batch(
        [InboxBody(body=b, body_sha256=hashlib.sha256(b).hexdigest(), status=status) for b in bodies]
    )
    found = await rows(store, "SELECT id, body FROM webhook_events ORDER BY id")
    return [r["id"] for r in found if bytes(r["body"]) in bodies]


def conversation(contact: str, mid: str) -> ConversationRecord:
    return ConversationRecord(
        sender_id=contact,
        events=[
            EventRecord(
                event_type="message_received", event_timestamp=1_732_900_000_000, message_id=mid, content="hi"
            )
        ],
        last_message="hi",
        last_message_time=1_732_900_000_000,
    )


async def counts(store: Store, page_id: str) -> dict[str, int]:
    found = {}
    for table in ("messenger_conversations", "contact_interaction_events", "sync_state", "sync_schedule"):
        found[table] = len(await rows(store, f"SELECT 1 FROM {table} WHERE page_id = $1", page_id))
    found["sync_locks"] = len(await rows(store, "SELECT 1 FROM sync_locks WHERE page_id = $1", page_id))
    return found


# ---- retention -------------------------------------------------------------------------------------


async def test_retention_deletes_old_applied_and_ignored_rows_and_keeps_the_rest(store: Store) -> None:
    statuses = ["applied", "applied", "ignored", "failed", "invalid", "pending", "applied"]
    ids = await inbox(store, *(message_body(FB_A, ALICE_CONTACT, mid=f"m{i}") for i in range(len(statuses))))
    for row_id, status in zip(ids, statuses, strict=True):
        await execute(store, "UPDATE webhook_events SET status = $1 WHERE id = $2", status, row_id)
    old = ids[:6]  # the last applied row is recent
    cond = ", ".join(str(i) for i in old)
    await execute(
        store, f"UPDATE webhook_events SET received_at = received_at - {31 * DAY_MS} WHERE id IN ({cond})"
    )

    deleted = []
    while (n := await store.delete_expired_webhook_events(30 * DAY_MS, 2)) > 0:
        deleted.append(n)

    left = {r["id"]: r["status"] for r in await rows(store, "SELECT id, status FROM webhook_events")}
    assert deleted == [2, 1]  # in batches of at most 2
    assert left == {ids[3]: "failed", ids[4]: "invalid", ids[5]: "pending", ids[6]: "applied"}


# ---- deleting a page ---------------------------------------------------------------------------------


async def test_deleting_a_page_removes_its_rows_and_nothing_of_another_page(store: Store) -> None:
    mine, _ = await store.register_page("alice", FB_A, "EAAB-a", "A")
    other, _ = await store.register_page("alice", FB_B, "EAAB-b", "B")
    bobs, _ = await store.register_page("bob", FB_A, "EAAB-bob", "A for Bob")  # the same Facebook Page
    for page in (mine, other, bobs):
        await write_conversations(store, page.id, [conversation(ALICE_CONTACT, "m_x")])
        lease = await store.acquire_sync_lock(page.id, "test", 30)
        assert lease is not None
        await store.start_sync_session(lease, page.user_id, f"s-{page.id}", "full")
        await store.release_sync_lock(lease)
        await store.set_schedule(page.id, "ok")
    inbox_ids = await inbox(store, message_body(FB_A, ALICE_CONTACT))
    before = {p.id: await counts(store, p.id) for p in (other, bobs)}

    assert not await store.delete_page("bob", mine.id)  # another user's page: as if it did not exist
    assert (await counts(store, mine.id))["messenger_conversations"] == 1
    assert await store.delete_page("alice", mine.id)
    assert not await store.delete_page("alice", mine.id)

    assert await counts(store, mine.id) == dict.fromkeys(before[other.id], 0)
    assert await store.get_page("alice", mine.id) is None
    assert {p.id: await counts(store, p.id) for p in (other, bobs)} == before
    assert before[other.id]["messenger_conversations"] == 1 and before[bobs.id]["sync_schedule"] == 1
    # Its inbox rows stay until retention removes them (Bob's row of the Page still uses them).
    assert [r["id"] for r in await rows(store, "SELECT id FROM webhook_events")] == inbox_ids


async def test_a_sync_running_while_its_page_is_deleted_stops_at_its_next_write(store: Store) -> None:
    page, _ = await store.register_page("alice", FB_A, "EAAB-a", "A")
    lease = await store.acquire_sync_lock(page.id, "running-sync", 30)
    assert lease is not None
    await store.start_sync_session(lease, "alice", "s-1", "full")

    assert await store.delete_page("alice", page.id)

    progress = SyncProgress(last_cursor="c1", synced=1, session_watermark=None)
    with pytest.raises(LeaseLost):  # a clean stop (409 lease_lost), not a foreign key error (500)
        await store.save_conversation_page(lease, [conversation(ALICE_CONTACT, "m_1")], progress)
    with pytest.raises(LeaseLost):
        await store.save_sync_progress(lease, progress)
    assert await store.extend_sync_lock(lease, 30) is None
    assert await rows(store, "SELECT 1 FROM messenger_conversations") == []


# ---- deleting a conversation ---------------------------------------------------------------------------


async def test_deleting_a_conversation_removes_its_events_and_the_inbox_rows_of_only_that_contact(
    store: Store,
) -> None:
    page, _ = await store.register_page("alice", FB_A, "EAAB-a", "A")
    other_page, _ = await store.register_page("alice", FB_B, "EAAB-b", "B")
    await write_conversations(
        store, page.id, [conversation(ALICE_CONTACT, "m_a"), conversation(OTHER_CONTACT, "m_o")]
    )
    await write_conversations(store, other_page.id, [conversation(ALICE_CONTACT, "m_b")])
    target = (
        await rows(
            store,
            "SELECT id FROM messenger_conversations WHERE page_id = $1 AND sender_id = $2",
            page.id,
            ALICE_CONTACT,
        )
    )[0]["id"]
    only_hers = message_body(FB_A, ALICE_CONTACT, mid="m_only")
    hers_twice = message_body(FB_A, ALICE_CONTACT, ALICE_CONTACT, mid="m_twice")
    shared = message_body(FB_A, ALICE_CONTACT, OTHER_CONTACT, mid="m_shared")
    other_contact = message_body(FB_A, OTHER_CONTACT, mid="m_other")
    other_page_hers = message_body(FB_B, ALICE_CONTACT, mid="m_elsewhere")
    unreadable = b'{"object": "page", "entry": "' + ALICE_CONTACT.encode() + b'"}'
    ids = await inbox(store, only_hers, hers_twice, shared, other_contact, other_page_hers, unreadable)
    await execute(store, "UPDATE webhook_events SET status = 'applied'")

    assert not await store.delete_conversation("bob", target, contacts_of)  # another user's: untouched
    assert len(await rows(store, "SELECT id FROM webhook_events")) == 6
    assert await store.delete_conversation("alice", target, contacts_of, batch=2)  # several batches
    assert not await store.delete_conversation("alice", target, contacts_of)

    left = {r["id"] for r in await rows(store, "SELECT id FROM webhook_events")}
    assert left == set(ids[2:])  # shared, the other contact's, the other page's, the unreadable one
    assert await rows(store, "SELECT 1 FROM messenger_conversations WHERE id = $1", target) == []
    assert (
        await rows(store, "SELECT 1 FROM contact_interaction_events WHERE conversation_id = $1", target) == []
    )
    remaining = await rows(store, "SELECT page_id, sender_id FROM messenger_conversations ORDER BY page_id")
    assert sorted((r["page_id"], r["sender_id"]) for r in remaining) == sorted(
        [(page.id, OTHER_CONTACT), (other_page.id, ALICE_CONTACT)]
    )
    assert len(await rows(store, "SELECT 1 FROM contact_interaction_events")) == 2


# ---- the schedule -----------------------------------------------------------------------------------------


async def test_due_pages_oldest_first_skipping_locked_invalid_held_and_recently_complete(
    store: Store,
) -> None:
    pages = [(await store.register_page("alice", str(110_000 + i), f"t{i}", None))[0] for i in range(6)]
    for i, page in enumerate(pages):  # created an hour apart, oldest first
        await execute(
            store,
            "UPDATE facebook_pages SET created_at = created_at - $1 WHERE id = $2",
            (10 - i) * HOUR_MS,
            page.id,
        )
    locked, invalid, held, complete, backoff, new = pages
    assert await store.acquire_sync_lock(locked.id, "another-replica", 30) is not None
    await store.mark_token_invalid(invalid.id)
    await store.update_rate_pool([f"page:{held.facebook_page_id}"], _hold_for_an_hour)
    lease = await store.acquire_sync_lock(complete.id, "s", 30)
    assert lease is not None
    await store.start_sync_session(lease, "alice", "s-c", "full")
    await store.save_sync_progress(
        lease, SyncProgress(last_cursor=None, synced=1, session_watermark=1, is_complete=True)
    )
    await store.release_sync_lock(lease)
    await store.record_sync_failure(backoff.id, "boom", 60_000, 900_000)

    due = await store.due_pages(HOUR_MS, 10, 10_000)
    assert [d.page_id for d in due] == [new.id]
    # With no interval the complete page is due again at once, after the older new one.
    assert [d.page_id for d in await store.due_pages(0, 10, 10_000)] == [new.id, complete.id]
    assert await store.due_pages(HOUR_MS, 10, 10_000, exclude=[new.id]) == []
    await store.register_page("alice", invalid.facebook_page_id, "a new token", None)  # token valid again
    assert [d.page_id for d in await store.due_pages(HOUR_MS, 10, 10_000)] == [invalid.id, new.id]


def _hold_for_an_hour(now: int, pool: dict[str, Any]) -> None:
    for row in pool.values():
        row.hold_until = now + HOUR_MS


async def test_failures_back_off_doubling_up_to_the_cap_and_success_resets_them(store: Store) -> None:
    page, _ = await store.register_page("alice", FB_A, "t", None)
    waits = []
    for _ in range(6):
        entry = await store.record_sync_failure(page.id, "graph_unavailable: boom", 60_000, 900_000)
        assert entry is not None and entry.not_before is not None
        waits.append((entry.failures, round((entry.not_before - entry.updated_at) / 1000)))
    assert waits == [(1, 60), (2, 120), (3, 240), (4, 480), (5, 900), (6, 900)]
    await store.set_schedule(page.id, "ok")
    entry = await schedule_of(store, page.id)
    assert entry is not None and (entry.outcome, entry.failures, entry.not_before, entry.last_error) == (
        "ok",
        0,
        None,
        None,
    )
    await store.set_schedule(
        page.id, "rate_limited", delay_ms=5_000, last_error="graph_rate_limited: slow down"
    )
    entry = await schedule_of(store, page.id)
    assert entry is not None and entry.not_before is not None and entry.not_before - entry.updated_at >= 4_990
    # A page deleted meanwhile gets no schedule row (and no foreign key error).
    assert await store.record_sync_failure("no-such-page", "boom", 60_000, 900_000) is None
    await store.set_schedule("no-such-page", "ok")
    assert await schedule_of(store, "no-such-page") is None
