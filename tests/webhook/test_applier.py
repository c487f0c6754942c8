"""The webhook applier: batches, failures, replay, restarts, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from starlette.testclient import TestClient

from core.errors import DatabaseUnavailable
from core.metrics import Metrics
from core.records import ConversationRecord
from core.settings import Settings
from storage import Storage
from storage.base import InboxBody
from storage.inbox import Transaction
from tests.helpers import make_settings, register_page, running_app
from tests.helpers.webhook import (
    PAGE,
    A,
    B,
    call,
    conversations,
    drain,
    events,
    fixture,
    inbox,
    inbox_rows,
    message_body,
    post,
    signed,
    wait_until_drained,
)
from webhook import applier as applier_module
from webhook import parse as parse_module
from webhook.applier import Applier, run_replay_command
from webhook.apply import apply_batch
from webhook.intake import SATURATED_BATCH, InboxWriter

POISON = "7700000000000666"
Capsys = pytest.CaptureFixture[str]


async def post_async(http: Any, body: bytes) -> int:
    return int((await http.post("/api/webhook", content=body, headers=signed(body))).status_code)


def poison_writes(monkeypatch: pytest.MonkeyPatch, message: str = "injected failure") -> None:
    """Make writing any record of the POISON contact raise inside the apply transaction (the
    `write_records` primitive, of every storage in this process)."""
    original = Transaction.write_records

    async def failing(txn: Transaction, page_id: str, records: Sequence[ConversationRecord]) -> Any:
        if any(rec.sender_id == POISON for rec in records):
            raise RuntimeError(message)
        return await original(txn, page_id, records)

    monkeypatch.setattr(Transaction, "write_records", failing)


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
    storage = wclient.app_state["services"].storage
    poison_writes(monkeypatch)

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
    original = applier_module.apply_batch
    calls: list[Any] = []

    async def once_broken(storage: Storage, parse: Any, limit: int, ids: Any = None) -> Any:
        calls.append(ids)
        if len(calls) == 1:
            raise ConnectionResetError("connection lost mid-batch")
        return await original(storage, parse, limit, ids)

    monkeypatch.setattr(applier_module, "apply_batch", once_broken)
    summary = drain(wclient)
    assert (summary.applied, summary.failed) == (3, 0)
    assert calls[0] is None and sorted(len(c) for c in calls[1:4]) == [1, 1, 1]  # then row by row
    assert inbox(wclient) == {"applied": 3}
    (conv,) = conversations(wclient, page["pageId"])
    assert conv["messageCount"] == 3


def test_an_outage_during_a_rows_apply_leaves_it_pending_not_failed(
    wclient: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_page(wclient)
    for i in range(2):
        assert post(wclient, message_body(f"m_{i}", f"t{i}", 1_732_900_000_000 + i)).status_code == 200
    original = applier_module.apply_batch
    calls: list[Any] = []

    async def outage(storage: Storage, parse: Any, limit: int, ids: Any = None) -> Any:
        calls.append(ids)
        if len(calls) <= 2:  # the batch, then the first row alone: the database is away
            raise DatabaseUnavailable("The database is unavailable; retry later")
        return await original(storage, parse, limit, ids)

    monkeypatch.setattr(applier_module, "apply_batch", outage)
    with pytest.raises(DatabaseUnavailable):
        drain(wclient)
    assert inbox(wclient) == {"pending": 2}  # nothing marked failed for the database's fault
    assert drain(wclient).applied == 2  # the database is back: applied, no replay needed
    assert inbox(wclient) == {"applied": 2}


async def test_replay_command_applies_failed_rows(
    quiet_settings: Settings, storage: Storage, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    poisoned = message_body("m_p", "from poison", 1_732_900_000_002, sender=POISON)
    invalid = fixture("invalid_outer_shape.json")
    async with running_app(quiet_settings) as http:
        assert await post_async(http, poisoned) == 200
        assert await post_async(http, invalid) == 200  # acknowledged: it is Meta's body
    poison_writes(monkeypatch)
    summary = await Applier(storage, quiet_settings, Metrics()).drain()
    assert (summary.failed, summary.invalid) == (1, 1)
    assert await storage.webhook_status_counts() == {"failed": 1, "invalid": 1}

    monkeypatch.undo()
    assert await run_replay_command(quiet_settings) == 0
    out = capsys.readouterr().out
    assert "requeued: 2" in out
    assert "applied: 1" in out
    # The body is still unreadable: it stays invalid, ready for a later replay.
    assert await storage.webhook_status_counts() == {"applied": 1, "invalid": 1}
    (conv,) = await storage.list_conversations(page.id, 10, None)
    assert conv.sender_id == POISON


async def test_replay_command_reports_rows_that_fail_again(
    quiet_settings: Settings, storage: Storage, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    poisoned = message_body("m_p", "from poison", 1_732_900_000_002, sender=POISON)
    async with running_app(quiet_settings) as http:
        assert await post_async(http, poisoned) == 200
    # run_replay_command opens its own storage: the primitive of every storage is poisoned.
    poison_writes(monkeypatch, "still broken")
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
    assert conv.message_count == 30
    assert len(await storage.list_events(conv.id, 100, None)) == 30


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
    assert conv.last_message == "hello"


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
    assert conv.message_count == 5


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


# ---- statuses, replay after a fix, what the error column holds ----------------------------------


class OldSchema:
    """Stands in for a stricter schema the service once had: ids sent as numbers were unreadable.

    Replaying after "the fix" (undoing this) must apply what the old schema could not read.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_entries, real_item = parse_module._entries_decoder, parse_module._item_decoder

        class StrictEntries:
            def decode(self, raw: Any) -> Any:
                if re.search(rb'"id":\d', bytes(raw).split(b'"messaging"')[0]):
                    raise msgspec.ValidationError("Expected `str`, got `int` - at `$[0].id`")
                return real_entries.decode(raw)

        class StrictItems:
            def decode(self, raw: Any) -> Any:
                if b'"timestamp":"' in bytes(raw):
                    raise msgspec.ValidationError("Expected `int`, got `str` - at `$.timestamp`")
                return real_item.decode(raw)

        monkeypatch.setattr(parse_module, "_entries_decoder", StrictEntries())
        monkeypatch.setattr(parse_module, "_item_decoder", StrictItems())


async def test_replay_applies_invalid_rows_and_skipped_items_after_a_fix(
    quiet_settings: Settings, storage: Storage, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    numbers, string_ts = fixture("ids_as_numbers.json"), fixture("timestamp_string.json")
    plain = message_body("m_plain", "plain", 1_732_900_000_001)
    async with running_app(quiet_settings) as http:
        for body in (numbers, string_ts, plain):
            assert await post_async(http, body) == 200
    OldSchema(monkeypatch)
    summary = await Applier(storage, quiet_settings, Metrics()).drain()
    assert (summary.invalid, summary.applied, summary.skipped_items) == (1, 2, 1)
    (conv,) = await storage.list_conversations(page.id, 10, None)
    assert [e.message_id for e in await storage.list_events(conv.id, 10, None)] == ["m_plain"]

    monkeypatch.undo()  # the schema is fixed
    assert await run_replay_command(quiet_settings) == 0
    out = capsys.readouterr().out
    assert "requeued: 2" in out  # the invalid row and the applied one that skipped an item
    assert "applied: 2" in out and "items skipped: 0" in out
    assert await storage.webhook_status_counts() == {"applied": 3}
    async with storage.engine.reader() as conn:  # type: ignore[attr-defined]
        errors = [r["error"] for r in await conn.fetch("SELECT error FROM webhook_events")]
    assert errors == [None, None, None]
    convs = await storage.list_conversations(page.id, 10, None)
    assert sum(c.message_count for c in convs) == 4  # both ids_as_numbers messages, the string one, plain
    assert await run_replay_command(quiet_settings) == 0  # nothing left to replay
    assert "requeued: 0" in capsys.readouterr().out


def test_replaying_an_applied_row_with_skipped_items_is_idempotent(wclient: TestClient) -> None:
    page = register_page(wclient)
    assert post(wclient, fixture("invalid_item_type.json")).status_code == 200
    drain(wclient)
    storage = wclient.app_state["services"].storage
    assert call(wclient, storage.requeue_webhooks, ["failed", "invalid"]) == 0
    for _ in range(2):
        assert call(wclient, lambda: storage.requeue_webhooks(["failed"], with_skipped_items=True)) == 1
        assert drain(wclient).applied == 1
    [row] = inbox_rows(wclient)
    assert row["status"] == "applied" and row["attempts"] == 3
    assert row["error"].endswith("- at `$.entry[0].messaging[0].message.text`")
    [conv] = conversations(wclient, page["pageId"])
    assert conv["messageCount"] == 1 and len(events(wclient, conv["id"])) == 1


async def test_errors_are_stored_without_nul(storage: Storage) -> None:
    """PostgreSQL text cannot hold U+0000: an error carrying one must still be recorded."""
    raws = [b'{"n": 1}', b'{"n": 2}']
    await storage.record_webhook_batch([InboxBody(b, hashlib.sha256(b).hexdigest()) for b in raws])

    def unreadable(body: bytes) -> Any:
        raise ValueError("bad \x00 byte in " + body.decode())

    report = await apply_batch(storage, unreadable, 1)
    assert report.invalid == 1
    [pending] = await storage.pending_webhook_ids(10)
    await storage.mark_webhook_failed([pending], "RuntimeError: text with \x00 in it")
    async with storage.engine.reader() as conn:  # type: ignore[attr-defined]
        rows = await conn.fetch("SELECT status, error FROM webhook_events ORDER BY id")
    assert [(r["status"], r["error"]) for r in rows] == [
        ("invalid", 'bad  byte in {"n": 1}'),
        ("failed", "RuntimeError: text with  in it"),
    ]


def test_failure_text_with_nul_marks_the_row_failed(
    wclient: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_page(wclient)
    assert post(wclient, message_body("m_p", "poison", 1_732_900_000_002, sender=POISON)).status_code == 200
    poison_writes(monkeypatch, "cannot store \x00")
    assert drain(wclient).failed == 1
    monkeypatch.undo()
    [row] = inbox_rows(wclient)
    assert (row["status"], row["error"]) == ("failed", "RuntimeError: cannot store ")


def test_invalid_rows_are_counted_in_metrics(wclient: TestClient) -> None:
    for body in (b"not json", fixture("invalid_outer_shape.json"), fixture("message_text.json")):
        assert post(wclient, body).status_code == 200
    summary = drain(wclient)
    assert (summary.invalid, summary.ignored) == (2, 1)
    metrics = wclient.get("/metrics").text
    assert 'webhook_inbox_rows_total{status="invalid"} 2.0' in metrics
    assert 'webhook_inbox_rows_total{status="ignored"} 1.0' in metrics
    assert 'webhook_received_total{outcome="accepted"} 3.0' in metrics
