"""POST/GET /api/webhook end to end: signature, inbox, applier, read API.

Most tests run the app with ``run_applier=False`` and drain the inbox explicitly, so what
they check does not depend on timing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.datastructures import Secret
from starlette.testclient import TestClient

from app import create_app
from core.metrics import Metrics
from core.settings import Settings
from schema.graph import decode_conversation_list
from storage import Storage
from storage.base import SyncProgress
from sync.graph_records import conversation_to_record
from tests.helpers import (
    FIXTURES,
    VERIFY_TOKEN,
    make_settings,
    register_page,
    running_app,
)
from tests.helpers.webhook import (
    PAGE,
    PAGE2,
    WEBHOOKS,
    A,
    B,
    C,
    call,
    conversations,
    drain,
    events,
    fixture,
    inbox,
    inbox_rows,
    message_body,
    nested_body,
    post,
    signed,
    wait_until_drained,
)
from webhook.applier import Applier

# ---- GET: subscription check ----------------------------------------------------------------------


def test_verification_echoes_the_challenge(wclient: TestClient) -> None:
    response = wclient.get(
        "/api/webhook",
        params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"},
    )
    assert response.status_code == 200
    assert response.text == "1158201444"
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    "params",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN},
        {},
    ],
)
def test_verification_refused(wclient: TestClient, params: dict[str, str]) -> None:
    response = wclient.get("/api/webhook", params=params)
    assert response.status_code == 403
    assert response.json()["success"] is False
    assert response.json()["code"] == "forbidden"


def test_verification_refused_without_configured_token(db_url: str) -> None:
    app = create_app(make_settings(db_url, fb_verify_token=None, run_applier=False))
    with TestClient(app) as client:
        response = client.get(
            "/api/webhook", params={"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"}
        )
    assert response.status_code == 403


# ---- POST: refusals --------------------------------------------------------------------------------


def test_unsigned_wrongly_signed_and_tampered_bodies_are_refused(wclient: TestClient) -> None:
    body = (WEBHOOKS / "message_text.json").read_bytes()
    tampered = body.replace(b"Hola", b"Hole")
    cases = [
        {"Content-Type": "application/json"},
        signed(body, secret="not-the-app-secret"),
        {"X-Hub-Signature-256": "sha1=" + "0" * 40},
        {"X-Hub-Signature-256": "sha256=zz"},
    ]
    for headers in cases:
        response = wclient.post("/api/webhook", content=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["code"] == "unauthorized"
    response = wclient.post("/api/webhook", content=tampered, headers=signed(body))
    assert response.status_code == 401
    assert inbox(wclient) == {}


def test_body_over_one_mib_is_refused(wclient: TestClient) -> None:
    body = b'{"object":"page","entry":[],"pad":"' + b"x" * (1024 * 1024) + b'"}'
    response = wclient.post("/api/webhook", content=body, headers=signed(body))
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert inbox(wclient) == {}


def test_no_app_secret_answers_503(db_url: str) -> None:
    app = create_app(make_settings(db_url, fb_app_secret=None, run_applier=False))
    body = (WEBHOOKS / "message_text.json").read_bytes()
    with TestClient(app) as client:
        response = client.post("/api/webhook", content=body, headers=signed(body))
        assert response.status_code == 503
        assert response.json()["code"] == "webhook_not_configured"
        assert inbox(client) == {}


def test_database_down_answers_503(wclient: TestClient) -> None:
    body = (WEBHOOKS / "message_text.json").read_bytes()
    call(wclient, wclient.app_state["services"].storage.close)
    response = post(wclient, body)
    assert response.status_code == 503
    assert response.json()["code"] == "database_unavailable"
    assert response.json()["success"] is False
    assert 'webhook_received_total{outcome="database_unavailable"} 1.0' in wclient.get("/metrics").text


# ---- POST: every signed body is acknowledged once stored -----------------------------------------

UNREADABLE = {
    "outer_shape": (fixture("invalid_outer_shape.json"), "Expected `array`, got `object` - at `$.entry`"),
    "not_json": (b'{"object": "page", "entry": [}', "Malformed webhook body: JSON is malformed"),
    "not_an_object": (b'["page"]', "Expected `object`, got `array` - at `$`"),
    "empty": (b"", "Malformed webhook body: Input data was truncated"),
    "not_utf8": (b'{"object": "page\xff"}', "Malformed webhook body"),
    "nested_100k": (nested_body(100_000), "JSON nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_signed_body_is_acknowledged_kept_and_ends_invalid(wclient: TestClient, case: str) -> None:
    body, reason = UNREADABLE[case]
    register_page(wclient)
    for _ in range(2):  # Meta redelivers: still one row
        response = post(wclient, body)
        assert response.status_code == 200, response.text
        assert response.text == "EVENT_RECEIVED"
    assert inbox(wclient) == {"pending": 1}  # stored unread: the request decodes nothing
    summary = drain(wclient)
    assert (summary.invalid, summary.applied, summary.failed) == (1, 0, 0)
    [row] = inbox_rows(wclient)
    assert row["status"] == "invalid"
    assert reason in row["error"]
    assert row["attempts"] == 1 and row["applied_at"] is None
    assert 'webhook_inbox_rows_total{status="invalid"} 1.0' in wclient.get("/metrics").text
    assert drain(wclient).claimed == 0  # invalid rows wait for a replay
    assert inbox(wclient) == {"invalid": 1}


async def test_invalid_rows_keep_their_raw_body(quiet_settings: Settings, storage: Storage) -> None:
    body = fixture("invalid_outer_shape.json")
    async with running_app(quiet_settings) as http:
        response = await http.post("/api/webhook", content=body, headers=signed(body))
    assert response.status_code == 200
    await Applier(storage, quiet_settings, Metrics()).drain()
    async with storage.engine.reader() as conn:  # type: ignore[attr-defined]
        (row,) = await conn.fetch("SELECT status, error, body, attempts FROM webhook_events")
    assert row["status"] == "invalid"
    assert row["error"] == "Invalid webhook body: Expected `array`, got `object` - at `$.entry`"
    assert bytes(row["body"]) == body  # the raw bytes, so a fix can replay them


# ---- POST: accepted ------------------------------------------------------------------------------


def test_accepted_body_answers_event_received_after_commit(wclient: TestClient) -> None:
    body = (WEBHOOKS / "message_text.json").read_bytes()
    response = post(wclient, body)
    assert response.status_code == 200
    assert response.text == "EVENT_RECEIVED"
    assert response.headers["content-type"].startswith("text/plain")
    assert inbox(wclient) == {"pending": 1}
    assert post(wclient, body).status_code == 200  # Meta redelivers: still one row
    assert inbox(wclient) == {"pending": 1}


def test_repeated_acknowledgements_carry_their_own_headers(wclient: TestClient) -> None:
    for i in range(3):
        response = post(wclient, message_body(f"m_{i}", "hi", 1_732_900_000_000 + i))
        assert response.status_code == 200
        assert len(response.headers.get_list("x-request-id")) == 1
        assert response.headers["content-length"] == "14"


def test_message_fields_reach_the_read_api(wclient: TestClient) -> None:
    page = register_page(wclient)
    raw = (WEBHOOKS / "message_text.json").read_bytes()
    item = json.loads(raw)["entry"][0]["messaging"][0]
    assert post(wclient, raw).status_code == 200
    drain(wclient)
    (conv,) = conversations(wclient, page["pageId"])
    assert conv["senderId"] == item["sender"]["id"]
    assert conv["lastMessage"] == item["message"]["text"]
    assert conv["lastMessageTime"] == item["timestamp"]
    assert conv["messageCount"] == 1
    (event,) = events(wclient, conv["id"])
    assert event["eventType"] == "message_received"
    assert event["messageId"] == item["message"]["mid"]
    assert event["content"] == item["message"]["text"]
    assert event["eventTimestamp"] == item["timestamp"]


def test_unknown_kind_is_counted_not_an_error(wclient: TestClient) -> None:
    register_page(wclient)
    assert post(wclient, (WEBHOOKS / "unknown_kind.json").read_bytes()).status_code == 200
    summary = drain(wclient)
    assert summary.unknown_items == 1
    assert summary.applied == 1 and summary.failed == 0
    metrics = wclient.get("/metrics").text
    assert "webhook_unknown_items_total 1.0" in metrics
    assert "webhook_skipped_items_total 0.0" in metrics
    assert 'webhook_inbox_rows_total{status="applied"} 1.0' in metrics


def test_batch_of_two_entries_with_several_events(wclient: TestClient) -> None:
    page1 = register_page(wclient, fb_page_id=PAGE)
    page2 = register_page(wclient, fb_page_id=PAGE2)
    assert post(wclient, (WEBHOOKS / "batch_two_entries.json").read_bytes()).status_code == 200
    drain(wclient)
    assert inbox(wclient) == {"applied": 1}
    first = {c["senderId"]: c for c in conversations(wclient, page1["pageId"])}
    second = {c["senderId"]: c for c in conversations(wclient, page2["pageId"])}
    assert set(first) == {A, B} and set(second) == {A, C}
    assert sorted(e["eventType"] for e in events(wclient, first[A]["id"])) == [
        "message_delivered",
        "message_read",
        "message_received",
        "message_sent",
    ]
    assert first[A]["messageCount"] == 2
    assert first[A]["lastMessage"] == "¡Hola! Te respondemos en unos minutos."
    assert [e["eventType"] for e in events(wclient, first[B]["id"])] == ["message_received"]
    assert [e["eventType"] for e in events(wclient, second[A]["id"])] == ["message_received"]
    assert [e["eventType"] for e in events(wclient, second[C]["id"])] == ["reaction"]
    assert second[C]["messageCount"] == 0


def test_newer_then_older_message_keeps_the_newer_as_last(wclient: TestClient) -> None:
    page = register_page(wclient)
    assert post(wclient, message_body("m_new", "newer", 1_732_900_200_000)).status_code == 200
    drain(wclient)
    assert post(wclient, message_body("m_old", "older", 1_732_900_100_000)).status_code == 200
    drain(wclient)
    (conv,) = conversations(wclient, page["pageId"])
    assert conv["lastMessage"] == "newer"
    assert conv["lastMessageTime"] == 1_732_900_200_000
    assert conv["messageCount"] == 2
    assert len(events(wclient, conv["id"])) == 2


def test_older_and_newer_in_one_batch_keep_the_newer(wclient: TestClient) -> None:
    page = register_page(wclient)
    assert post(wclient, message_body("m_new", "newer", 1_732_900_200_000)).status_code == 200
    assert post(wclient, message_body("m_old", "older", 1_732_900_100_000)).status_code == 200
    drain(wclient)
    (conv,) = conversations(wclient, page["pageId"])
    assert (conv["lastMessage"], conv["messageCount"]) == ("newer", 2)


def test_page_registered_by_two_users_gets_events_on_both(wclient: TestClient) -> None:
    alice = register_page(wclient, "alice")
    bob = register_page(wclient, "bob")
    assert alice["pageId"] != bob["pageId"]
    assert post(wclient, (WEBHOOKS / "message_text.json").read_bytes()).status_code == 200
    drain(wclient)
    for user, page in (("alice", alice), ("bob", bob)):
        (conv,) = conversations(wclient, page["pageId"], user)
        assert [e["eventType"] for e in events(wclient, conv["id"], user)] == ["message_received"]
    assert inbox(wclient) == {"applied": 1}


def test_unregistered_page_stays_ignored(wclient: TestClient) -> None:
    register_page(wclient, fb_page_id="999999999999999")
    assert post(wclient, (WEBHOOKS / "message_text.json").read_bytes()).status_code == 200
    summary = drain(wclient)
    assert summary.ignored == 1
    assert inbox(wclient) == {"ignored": 1}


# ---- convergence with sync ----------------------------------------------------------------------------


def _synced_record() -> Any:
    listing = decode_conversation_list((FIXTURES / "graph" / "conversations_page1.json").read_bytes())
    record = conversation_to_record(listing.conversations[0], PAGE)
    assert record is not None
    return record


def _webhook_for(record: Any) -> bytes:
    """The webhook Meta sent for the newest message of a synced conversation."""
    newest = max(record.events, key=lambda e: e.event_timestamp)
    assert newest.event_type == "message_received"
    return message_body(newest.message_id, newest.content, newest.event_timestamp, sender=record.sender_id)


@pytest.mark.parametrize("order", ["webhook_then_sync", "sync_then_webhook"])
def test_webhook_and_sync_converge(wclient: TestClient, order: str) -> None:
    page = register_page(wclient)
    record = _synced_record()
    storage = wclient.app_state["services"].storage

    async def save_synced_page() -> None:  # what a sync does with a page of Graph's conversations
        lease = await storage.acquire_sync_lock(page["pageId"], "test-sync", 30)
        assert lease is not None
        await storage.start_sync_session(lease, "alice", "session-1", "full")
        await storage.save_conversation_page(lease, [record], SyncProgress(None, 1, None, is_complete=True))
        assert await storage.release_sync_lock(lease)

    def sync() -> None:
        call(wclient, save_synced_page)

    def webhook() -> None:
        assert post(wclient, _webhook_for(record)).status_code == 200
        drain(wclient)

    for step in (webhook, sync) if order == "webhook_then_sync" else (sync, webhook):
        step()
    (conv,) = conversations(wclient, page["pageId"])
    assert conv["senderId"] == record.sender_id
    assert conv["facebookConversationId"] == record.facebook_conversation_id
    assert conv["senderName"] == record.sender_name
    assert conv["lastMessageTime"] == record.last_message_time
    stored = events(wclient, conv["id"])
    mids = [e["messageId"] for e in stored]
    assert sorted(mids) == sorted(e.message_id for e in record.events)  # one event per message
    assert conv["messageCount"] == record.message_count
    assert inbox(wclient) == {"applied": 1}


# ---- concurrency and replicas ---------------------------------------------------------------------------


async def test_twenty_concurrent_identical_posts_give_one_row_and_one_event(
    quiet_settings: Settings, storage: Storage
) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    body = (WEBHOOKS / "message_text.json").read_bytes()
    async with running_app(quiet_settings) as http:
        responses = await asyncio.gather(
            *(http.post("/api/webhook", content=body, headers=signed(body)) for _ in range(20))
        )
    assert [r.status_code for r in responses] == [200] * 20
    assert await storage.webhook_status_counts() == {"pending": 1}
    await Applier(storage, quiet_settings, Metrics()).drain()
    assert await storage.webhook_status_counts() == {"applied": 1}
    (conv,) = await storage.list_conversations(page.id, 10, None)
    assert len(await storage.list_events(conv.id, 10, None)) == 1
    assert conv.message_count == 1


async def test_identical_posts_on_two_replicas_give_one_row_and_one_event(
    db_url: str, storage: Storage
) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    settings = make_settings(db_url)  # both replicas run their applier
    body = (WEBHOOKS / "message_text.json").read_bytes()
    async with running_app(settings) as one, running_app(settings) as two:
        responses = await asyncio.gather(
            *(
                http.post("/api/webhook", content=body, headers=signed(body))
                for http in (one, two)
                for _ in range(10)
            )
        )
        assert [r.status_code for r in responses] == [200] * 20
        assert await wait_until_drained(storage) == {"applied": 1}
    (conv,) = await storage.list_conversations(page.id, 10, None)
    assert len(await storage.list_events(conv.id, 10, None)) == 1
    assert conv.message_count == 1


async def test_replicas_share_distinct_events_of_one_conversation(db_url: str, storage: Storage) -> None:
    page, _ = await storage.register_page("alice", PAGE, "EAAB-token", "Test Page")
    settings = make_settings(db_url, applier_batch_size=3)
    bodies = [message_body(f"m_{i:03d}", f"text {i}", 1_732_900_000_000 + i) for i in range(40)]
    async with running_app(settings) as one, running_app(settings) as two:
        responses = await asyncio.gather(
            *(
                (one if i % 2 else two).post("/api/webhook", content=b, headers=signed(b))
                for i, b in enumerate(bodies)
            )
        )
        assert {r.status_code for r in responses} == {200}
        assert await wait_until_drained(storage) == {"applied": 40}
    (conv,) = await storage.list_conversations(page.id, 10, None)
    assert conv.message_count == 40
    assert conv.last_message == "text 39"
    assert len(await storage.list_events(conv.id, 100, None)) == 40


def test_secret_is_compared_as_configured(db_url: str) -> None:
    other = "another-secret"
    app = create_app(make_settings(db_url, fb_app_secret=Secret(other), run_applier=False))
    body = (WEBHOOKS / "message_text.json").read_bytes()
    with TestClient(app) as client:
        assert client.post("/api/webhook", content=body, headers=signed(body)).status_code == 401
        assert client.post("/api/webhook", content=body, headers=signed(body, other)).status_code == 200
