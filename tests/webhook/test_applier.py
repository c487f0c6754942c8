"""The webhook applier: batches, failures, replay, restarts, metrics."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from starlette.testclient import TestClient

from core.metrics import Metrics
from core.records import ConversationRecord
from core.settings import Settings
from storage import Storage
from storage.base import InboxBody
from tests.helpers import make_settings, register_page, running_app
from tests.helpers.webhook import (
    PAGE,
    WEBHOOKS,
    A,
    B,
    call,
    conversations,
    drain,
    events,
    inbox,
    message_body,
    post,
    signed,
    wait_until_drained,
)
from webhook.applier import Applier, run_replay_command
from webhook.intake import SATURATED_BATCH, InboxWriter

POISON = "7700000000000666"
Capsys = pytest.CaptureFixture[str]


async def post_async(http: Any, body: bytes) -> int:
    return int((await http.post("/api/webhook", content=body, headers=signed(body))).status_code)


def poison_writes(storage: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make writing any record of the POISON contact raise inside the apply transaction."""
    original = storage._write_records

    async def failing(conn: Any, page_id: str, records: list[ConversationRecord]) -> Any:
        if any(rec.sender_id == POISON for rec in records):
            raise RuntimeError("injected failure")
        return await original(conn, page_id, records)

    monkeypatch.setattr(storage, "_write_records", failing)


def test_failed_row_is_isolated_and_replay_completes_it(
    wclient: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = register_page(wclient)
    bodies = [
        message_body("m_a", "from A", 1_732_900_000_001, sender=A),
        message_body("m_p", "from poison", 1_732_900_000_002, sender=POISON),
        message_body("m_b", "from B", 1_732_900_000_003, sender=B),
    ]
    for body in bodies:
        assert post(wclient, body).status_code == 200
    storage = wclient.app_state["storage"]
    poison_writes(storage, monkeypatch)

    summary = drain(wclient)
    assert (summary.applied, summary.failed) == (2, 1)
    assert inbox(wclient) == {"applied": 2, "failed": 1}
    assert {c["senderId"] for c in conversations(wclient, page["pageId"])} == {A, B}
    metrics = wclient.get("/metrics").text
    assert 'webhook_inbox_rows_total{status="failed"} 1.0' in metrics
    assert 'webhook_inbox_rows_total{status="applied"} 2.0' in metrics

    monkeypatch.undo()  # the cause is fixed; replay
    assert drain(wclient).claimed == 0  # failed rows wait for a replay
    assert call(wclient, storage.requeue_webhooks, ["failed", "invalid"]) == 1
    assert drain(wclient).applied == 1
    assert inbox(wclient) == {"applied": 3}
    convs = {c["senderId"]: c for c in conversations(wclient, page["pageId"])}
    assert set(convs) == {A, B, POISON}
    assert [e["messageId"] for e in events(wclient, convs[POISON]["id"])] == ["m_p"]


def test_transient_batch_failure_fails_no_row(wclient: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    page = register_page(wclient)
    for i in range(3):
        assert post(wclient, message_body(f"m_{i}", f"t{i}", 1_732_900_000_000 + i)).status_code == 200
    storage = wclient.app_state["storage"]
    original = storage.apply_webhook_batch
    calls: list[Any] = []

    async def once_broken(parse: Any, limit: int, ids: Any = None) -> Any:
        calls.append(ids)
        if len(calls) == 1:
            raise ConnectionResetError("connection lost mid-batch")
        return await original(parse, limit, ids)

    monkeypatch.setattr(storage, "apply_webhook_batch", once_broken)
    summary = drain(wclient)
    assert (summary.applied, summary.failed) == (3, 0)
    assert calls[0] is None and sorted(len(c) for c in calls[1:4]) == [1, 1, 1]  # then row by row
    assert inbox(wclient) == {"applied": 3}
    (conv,) = conversations(wclient, page["pageId"])
    assert conv["messageCount"] == 3


async def test_replay_command_applies_failed_rows(
    quiet_settings: Settings, storage: Storage, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    poisoned = message_body("m_p", "from poison", 1_732_900_000_002, sender=POISON)
    invalid = (WEBHOOKS / "invalid_timestamp.json").read_bytes()
    async with running_app(quiet_settings) as http:
        assert await post_async(http, poisoned) == 200
        assert await post_async(http, invalid) == 400
    poison_writes(storage, monkeypatch)
    summary = await Applier(storage, quiet_settings, Metrics()).drain()
    assert summary.failed == 1
    assert await storage.webhook_status_counts() == {"failed": 1, "invalid": 1}

    monkeypatch.undo()
    assert await run_replay_command(quiet_settings) == 0
    out = capsys.readouterr().out
    assert "requeued: 2" in out
    assert "applied: 1" in out
    # The schema still rejects the invalid body: it stays invalid, ready for a later replay.
    assert await storage.webhook_status_counts() == {"applied": 1, "invalid": 1}
    (conv,) = await storage.list_conversations(page.id, 10, None)
    assert conv["senderId"] == POISON


async def test_replay_command_reports_rows_that_fail_again(
    quiet_settings: Settings, storage: Storage, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    poisoned = message_body("m_p", "from poison", 1_732_900_000_002, sender=POISON)
    async with running_app(quiet_settings) as http:
        assert await post_async(http, poisoned) == 200
    # run_replay_command opens its own storage: poison the class, not an instance.
    from storage.sql import SQLStorage

    original = SQLStorage._write_records

    async def failing(self: Any, conn: Any, page_id: str, records: list[ConversationRecord]) -> Any:
        if any(rec.sender_id == POISON for rec in records):
            raise RuntimeError("still broken")
        return await original(self, conn, page_id, records)

    monkeypatch.setattr(SQLStorage, "_write_records", failing)
    await Applier(storage, quiet_settings, Metrics()).drain()
    assert await run_replay_command(quiet_settings) == 1
    assert "failed: 1" in capsys.readouterr().out
    assert await storage.webhook_status_counts() == {"failed": 1}


async def test_rows_left_pending_by_a_stopped_app_are_applied_by_the_next(
    db_url: str, storage: Storage
) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    bodies = [message_body(f"m_{i:02d}", f"text {i}", 1_732_900_000_000 + i) for i in range(30)]
    async with running_app(make_settings(db_url, run_applier=False)) as http:
        for body in bodies:
            assert await post_async(http, body) == 200
    assert await storage.webhook_status_counts() == {"pending": 30}

    # A new app (its applier polls at start) picks up everything that was left.
    async with running_app(make_settings(db_url, applier_batch_size=7)):
        assert await wait_until_drained(storage) == {"applied": 30}
    (conv,) = await storage.list_conversations(page.id, 10, None)
    assert conv["messageCount"] == 30
    assert len(await storage.list_events(conv["id"], 100, None)) == 30


async def test_background_applier_wakes_on_commit(db_url: str, storage: Storage) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    # Polling is off the table (an hour): only the writer's notify() can wake the applier.
    settings = make_settings(db_url, applier_poll_seconds=3600.0)
    async with running_app(settings) as http:
        await wait_until_drained(storage)  # the start-up pass over an empty inbox
        body = message_body("m_1", "hello", 1_732_900_000_000)
        assert await post_async(http, body) == 200
        assert await wait_until_drained(storage) == {"applied": 1}
        metrics = (await http.get("/metrics")).text
    assert "webhook_apply_lag_seconds_count 1.0" in metrics
    (conv,) = await storage.list_conversations(page.id, 10, None)
    assert conv["lastMessage"] == "hello"


class Saturation:
    """Stands in for InboxWriter.saturated(): a switch the test flips."""

    def __init__(self) -> None:
        self.on = True

    def __call__(self) -> bool:
        return self.on


async def test_applier_yields_to_a_saturated_intake_then_catches_up(db_url: str, storage: Storage) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    saturated = Saturation()
    applier = Applier(storage, make_settings(db_url), Metrics(), intake_saturated=saturated)
    bodies = [message_body(f"m_{i}", f"burst {i}", 1_732_900_000_000 + i) for i in range(5)]
    await storage.record_webhook_batch([InboxBody(b, hashlib.sha256(b).hexdigest()) for b in bodies])
    await applier.start()
    try:
        applier.notify()
        # While the burst lasts the rows wait, durably, in the inbox (the yield is not timed
        # out: the default allows 30 s).
        for _ in range(10):
            await asyncio.sleep(0.02)
            assert await storage.webhook_status_counts() == {"pending": 5}
        saturated.on = False
        assert await wait_until_drained(storage) == {"applied": 5}
    finally:
        await applier.stop()
    (conv,) = await storage.list_conversations(page.id, 10, None)
    assert conv["messageCount"] == 5


async def test_applier_stops_yielding_after_its_bound(db_url: str, storage: Storage) -> None:
    await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    settings = make_settings(db_url, applier_max_yield_seconds=0.1)
    applier = Applier(storage, settings, Metrics(), intake_saturated=Saturation())  # saturated for ever
    body = message_body("m_1", "hello", 1_732_900_000_000)
    await storage.record_webhook_batch([InboxBody(body, hashlib.sha256(body).hexdigest())])
    await applier.start()
    try:
        applier.notify()
        assert await wait_until_drained(storage) == {"applied": 1}
    finally:
        await applier.stop()


async def test_intake_counts_as_saturated_only_under_queueing(db_url: str, storage: Storage) -> None:
    writer = InboxWriter(storage, make_settings(db_url), Metrics())
    await writer.start()
    try:
        one = message_body("m_0", "alone", 1_732_900_000_000)
        await writer.submit(InboxBody(one, hashlib.sha256(one).hexdigest()))
        assert not writer.saturated()  # a lone request is normal load
        burst = [
            message_body(f"m_{i}", "burst", 1_732_900_000_000 + i) for i in range(1, 4 * SATURATED_BATCH)
        ]
        await asyncio.gather(*(writer.submit(InboxBody(b, hashlib.sha256(b).hexdigest())) for b in burst))
        assert writer.saturated()
    finally:
        await writer.stop()
