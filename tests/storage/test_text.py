"""Text the database cannot hold (SPEC semantics 11): U+0000 is removed, alike on both engines.

PostgreSQL's text and jsonb refuse U+0000 (a Graph page holding one answered 500 at every sync;
a webhook holding one ended `failed` for good). Each test here asserts the exact rows stored,
so that the same assertion passing on SQLite and on PostgreSQL shows both store the same rows.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest
import respx
from starlette.testclient import TestClient

from core.records import ConversationRecord, EventRecord
from core.settings import Settings
from storage import Storage
from storage.conversations import encode_payload, records_without_nul, without_nul
from tests.helpers import auth_headers, register_page, running_app
from tests.helpers.storage import write_conversations
from tests.helpers.sync import PAGE_FB_ID, FakeGraph, assert_seed_checks, query
from tests.helpers.webhook import A, call, drain, inbox, message_body, post

NUL_CURSOR = "QVFIUnul\x00cursor"
CONTACT = "8100000000000001"
PLAIN = "8100000000000002"

CONVERSATION_COLUMNS = (
    "sender_id",
    "facebook_conversation_id",
    "sender_name",
    "last_message",
    "message_count",
    "unread_count",
)
EVENTS_SQL = (
    "SELECT c.sender_id, e.event_type, e.message_id, e.content, e.payload "
    "FROM contact_interaction_events e JOIN messenger_conversations c ON c.id = e.conversation_id "
    "ORDER BY e.message_id"
)


async def stored(storage: Storage) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every conversation and event row, as plain tuples (payloads decoded)."""
    rows = await query(
        storage, f"SELECT {', '.join(CONVERSATION_COLUMNS)} FROM messenger_conversations ORDER BY sender_id"
    )
    conversations = [tuple(r[name] for name in CONVERSATION_COLUMNS) for r in rows]
    events = [
        (r["sender_id"], r["event_type"], r["message_id"], r["content"], json.loads(r["payload"]))
        for r in await query(storage, EVENTS_SQL)
    ]
    return conversations, events


# ---- the pieces ---------------------------------------------------------------------------------


def test_without_nul() -> None:
    assert without_nul(None) is None
    text = "no nul here"
    assert without_nul(text) is text  # nothing copied when there is nothing to remove
    assert without_nul("a\x00b\x00\x00c") == "abc"


def test_encode_payload_removes_nul_from_every_string_and_keeps_the_rest() -> None:
    payload = {"k\x00ey": ["a\x00b", 1, None, True, {"deep": "x\x00"}], "literal": "\\u0000 stays"}
    assert json.loads(encode_payload(payload)) == {
        "key": ["ab", 1, None, True, {"deep": "x"}],
        "literal": "\\u0000 stays",
    }
    plain = {"from": "1", "to": ["2"], "literal": "\\u0000"}  # a backslash text, not a U+0000
    assert json.loads(encode_payload(plain)) == plain


def test_records_without_nul_copies_only_what_it_must() -> None:
    clean = ConversationRecord(
        sender_id="1", events=[EventRecord(event_type="message_received", event_timestamp=1)]
    )
    dirty = ConversationRecord(
        sender_id="2\x00",
        sender_name="N\x00",
        events=[
            EventRecord(
                event_type="message_received", event_timestamp=2, message_id="m_\x00", content="c\x00"
            )
        ],
    )
    records = [clean]
    assert records_without_nul(records) is records
    out = records_without_nul([clean, dirty])
    assert out[0] is clean
    assert (out[1].sender_id, out[1].sender_name) == ("2", "N")
    assert (out[1].events[0].message_id, out[1].events[0].content) == ("m_", "c")
    assert dirty.sender_id == "2\x00"  # the caller's record is untouched


# ---- the storage write path, inserts and updates ------------------------------------------------


async def test_write_path_stores_text_without_nul_and_merges_ids_that_differ_by_one(storage: Storage) -> None:
    page, _ = await storage.register_page("alice", PAGE_FB_ID, "EAAB-token-alice", "Acme")
    first = ConversationRecord(
        sender_id="77\x0001",
        sender_name="Ann\x00",
        facebook_conversation_id="t_\x001",
        last_message="one\x00",
        last_message_time=1_000,
        events=[
            EventRecord(
                event_type="message_received",
                event_timestamp=1_000,
                message_id="m_\x00one",
                content="one\x00",
                payload={"from": "77\x0001", "attachments": [{"payload": {"url": "u\x00"}}]},
            ),
            # The same mid but for its U+0000: one event, in one batch.
            EventRecord(
                event_type="message_received", event_timestamp=1_000, message_id="m_one", content="one"
            ),
        ],
    )
    counts = await write_conversations(storage, page.id, [first])
    assert (counts.inserted, counts.events_inserted) == (1, 1)
    # A later record of the same contact (stored now): merged into the row, updated without U+0000.
    later = ConversationRecord(
        sender_id="7701",
        sender_name="Ann B\x00",
        last_message="two\x00",
        last_message_time=2_000,
        events=[
            EventRecord(
                event_type="message_received", event_timestamp=2_000, message_id="m_two\x00", content="two"
            ),
            EventRecord(
                event_type="message_received", event_timestamp=1_000, message_id="m_o\x00ne", content="one"
            ),
        ],
    )
    counts = await write_conversations(storage, page.id, [later])
    assert (counts.inserted, counts.updated, counts.events_inserted) == (0, 1, 1)
    conversations, events = await stored(storage)
    assert conversations == [("7701", "t_1", "Ann B", "two", 2, 2)]
    assert events == [
        (
            "7701",
            "message_received",
            "m_one",
            "one",
            {"from": "7701", "attachments": [{"payload": {"url": "u"}}]},
        ),
        ("7701", "message_received", "m_two", "two", {}),
    ]
    # A name changed by a later record (a version-checked update of the stored row).
    renamed = ConversationRecord(sender_id="7701", sender_name="Ann\x00 C", events=[])
    counts = await write_conversations(storage, page.id, [renamed])
    assert (counts.updated, counts.events_inserted) == (1, 0)
    (row,) = await query(storage, "SELECT sender_name, version FROM messenger_conversations")
    assert (row["sender_name"], row["version"]) == ("Ann C", 2)
    await assert_seed_checks(storage)


# ---- a Graph page with U+0000 ---------------------------------------------------------------------

EXPECTED_CONVERSATIONS = [
    (CONTACT, "t_10160000000000001", "Zo\u00eb Null", "[image]", 2, 1),
    (PLAIN, "t_10160000000000002", "Ines Plain", "a literal \\u0000 is text, kept", 1, 0),
]
EXPECTED_EVENTS = [
    (
        "8100000000000001",
        "message_received",
        "m_nulone",
        "hello world",
        {"from": CONTACT, "to": [PAGE_FB_ID]},
    ),
    (
        CONTACT,
        "message_sent",
        "m_nultwo",
        "[image]",
        {
            "from": PAGE_FB_ID,
            "to": [CONTACT],
            "attachments": [
                {
                    "id": "att1",
                    "mime_type": "image/png",
                    "name": "photo.png",
                    "image_data": {"url": "https://cdn.example/p.png", "width": 640},
                    "key": ["ab", 1, None, True],
                }
            ],
        },
    ),
    (
        PLAIN,
        "message_received",
        "m_plain_one",
        "a literal \\u0000 is text, kept",
        {"from": PLAIN, "to": [PAGE_FB_ID]},
    ),
]


async def register(http: httpx.AsyncClient) -> str:
    response = await http.post(
        "/api/pages",
        json={"facebookPageId": PAGE_FB_ID, "accessToken": "EAAB-token-alice", "name": "Acme"},
        headers=auth_headers(),
    )
    assert response.status_code in (200, 201), response.text
    return str(response.json()["pageId"])


async def test_a_graph_page_with_nul_syncs_fully(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    error = {"error": {"message": "Unsupported get request.\x00 Try later", "code": 100, "fbtrace_id": "A"}}
    answers: dict[str | None, list[Any]] = {
        None: ["conversations_nul.json"],
        NUL_CURSOR: [httpx.Response(400, content=msgspec.json.encode(error))],
    }
    fake = FakeGraph(graph, answers)
    body = {"pageId": "", "facebookPageId": PAGE_FB_ID}
    async with running_app(settings, graph) as http:
        body["pageId"] = await register(http)
        # Page 2 fails with U+0000 in Graph's message: the error and the cursor are saved without it.
        failed = await http.post("/api/conversations/sync", json=body, headers=auth_headers())
        assert failed.status_code == 502 and failed.json()["code"] == "graph_request", failed.text
        state = await storage.get_sync_state(body["pageId"])
        assert state is not None and state.last_cursor == "QVFIUnulcursor"
        assert state.last_error is not None and "Unsupported get request. Try later" in state.last_error
        assert await stored(storage) == (EXPECTED_CONVERSATIONS, EXPECTED_EVENTS)
        # The session goes on from the saved cursor and completes; syncing again changes nothing.
        answers["QVFIUnulcursor"] = answers[NUL_CURSOR] = ["conversations_empty.json"]
        done = await http.post("/api/conversations/sync", json=body, headers=auth_headers())
        assert done.status_code == 200, done.text
        assert (done.json()["hasMore"], done.json()["syncSessionId"]) == (False, state.sync_session_id)
        again = await http.post(
            "/api/conversations/sync", json={**body, "mode": "full"}, headers=auth_headers()
        )
        assert again.status_code == 200, again.text
        assert (again.json()["inserted"], again.json()["unchanged"], again.json()["eventsInserted"]) == (
            0,
            2,
            0,
        )
    assert fake.calls == [None, NUL_CURSOR, "QVFIUnulcursor", None, NUL_CURSOR]
    assert await stored(storage) == (EXPECTED_CONVERSATIONS, EXPECTED_EVENTS)
    versions = await query(storage, "SELECT version FROM messenger_conversations")
    assert {r["version"] for r in versions} == {0}
    await assert_seed_checks(storage)


# ---- a webhook with U+0000 ------------------------------------------------------------------------


def test_a_webhook_with_nul_in_text_mid_and_sender_is_applied(wclient: TestClient) -> None:
    page = register_page(wclient)
    sender = A[:4] + "\x00" + A[4:]
    assert (
        post(
            wclient, message_body("m_web\x00hook", "hi\x00 there", 1_732_900_000_001, sender=sender)
        ).status_code
        == 200
    )
    # Meta sends it again without the U+0000: the same contact, the same event.
    assert (
        post(wclient, message_body("m_webhook", "hi there", 1_732_900_000_001, sender=A)).status_code == 200
    )
    drain(wclient)
    assert inbox(wclient) == {"applied": 2}
    storage = wclient.app_state["services"].storage
    conversations, events = call(wclient, stored, storage)
    assert conversations == [(A, None, None, "hi there", 1, 1)]
    assert [e[:4] for e in events] == [(A, "message_received", "m_webhook", "hi there")]
    listing = wclient.get(f"/api/conversations?pageId={page['pageId']}", headers=auth_headers()).json()
    assert [c["senderId"] for c in listing["conversations"]] == [A]


@pytest.mark.parametrize("where", ["text", "mid", "sender"])
def test_a_webhook_with_nul_is_applied_never_failed(wclient: TestClient, where: str) -> None:
    register_page(wclient)
    mid, text, sender = "m_one", "hello", A
    if where == "text":
        text = "hel\x00lo"
    elif where == "mid":
        mid = "m_\x00one"
    else:
        sender = "\x00" + A
    assert post(wclient, message_body(mid, text, 1_732_900_000_002, sender=sender)).status_code == 200
    drain(wclient)
    assert inbox(wclient) == {"applied": 1}
    conversations, events = call(wclient, stored, wclient.app_state["services"].storage)
    assert conversations == [(A, None, None, "hello", 1, 1)]
    assert [e[:4] for e in events] == [(A, "message_received", "m_one", "hello")]
