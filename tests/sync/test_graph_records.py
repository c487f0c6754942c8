"""Graph conversations from fixtures/graph/ turned into conversation and event records."""

from __future__ import annotations

from pathlib import Path

import msgspec

from core.records import EVENT_TYPES, ConversationRecord
from schema.graph import Conversation, decode_conversation_list
from sync.graph_records import conversation_to_record

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures" / "graph"
PAGE = "104325188712345"


def conversations(name: str) -> list[Conversation]:
    return decode_conversation_list((FIXTURES / name).read_bytes()).conversations


def record(name: str, index: int) -> ConversationRecord:
    result = conversation_to_record(conversations(name)[index], PAGE)
    assert result is not None
    return result


def test_text_conversation() -> None:
    rec = record("conversations_page1.json", 0)
    assert rec.sender_id == "7234519876543210"
    assert rec.sender_name == "Zo\u00eb \u00c5ngstr\u00f6m"
    assert rec.facebook_conversation_id == "t_10161023456789012"
    assert (rec.message_count, rec.unread_count) == (3, 1)
    assert rec.last_message == "Perfect, thank you \U0001f60a"
    assert rec.last_message_time == 1_748_779_200_000  # 2025-06-01T12:00:00+0000
    assert [(e.event_type, e.event_timestamp, e.content) for e in rec.events] == [
        ("message_received", 1_748_779_200_000, "Perfect, thank you \U0001f60a"),
        (
            "message_sent",
            1_748_778_940_000,
            "Yes, we ship across Canada \u2615 Delivery takes 3\u20135 days.",
        ),
        ("message_received", 1_748_778_733_000, "Hi! Do you ship to Montr\u00e9al?"),
    ]
    sent = rec.events[1]
    assert sent.payload == {"from": PAGE, "to": ["7234519876543210"]}
    received = rec.events[0]
    assert received.payload == {"from": "7234519876543210", "to": [PAGE]}
    assert all(e.message_id and e.message_id.startswith("m_") for e in rec.events)
    assert len({e.message_id for e in rec.events}) == 3


def test_attachment_only_message() -> None:
    rec = record("conversations_page1.json", 1)
    assert rec.sender_name == "\u4f50\u85e4 \u82b1\u5b50"
    assert rec.last_message == "[image]"  # the label a webhook gives the same message
    newest = rec.events[0]
    assert newest.content == "[image]"  # Graph sends "" for no text
    [attachment] = newest.payload["attachments"]
    assert attachment["mime_type"] == "image/jpeg"
    assert "attachments" not in rec.events[1].payload
    assert rec.events[1].content == "\u3053\u3093\u306b\u3061\u306f"


def test_counts_come_from_graph_not_from_the_20_detailed_messages() -> None:
    rec = record("conversations_page1.json", 2)
    assert rec.message_count == 27
    assert len(rec.events) == 2
    assert rec.last_message_time == max(e.event_timestamp for e in rec.events)


def test_every_fixture_conversation_makes_valid_records() -> None:
    for path in sorted(FIXTURES.glob("conversations_*.json")):
        for conv in conversations(path.name):
            rec = conversation_to_record(conv, PAGE)
            assert rec is not None, (path.name, conv.id)
            assert rec.sender_id != PAGE
            assert {e.event_type for e in rec.events} <= EVENT_TYPES
            msgspec.json.encode(rec)  # payloads are JSON-serializable


def test_incremental_page_brings_the_newer_message() -> None:
    rec = record("conversations_incremental.json", 1)
    assert rec.facebook_conversation_id == "t_10161023456789012"
    assert rec.last_message == "Your parcel is on its way!"
    assert rec.events[0].event_type == "message_sent"
    assert (rec.message_count, rec.unread_count) == (4, 0)


def test_newest_message_is_found_whatever_the_order() -> None:
    conv = conversations("conversations_page1.json")[0]
    reordered = msgspec.structs.replace(
        conv,
        messages=msgspec.structs.replace(conv.messages, data=list(reversed(conv.messages.data))),
    )
    rec = conversation_to_record(reordered, PAGE)
    assert rec is not None and rec.last_message == "Perfect, thank you \U0001f60a"


def test_no_messages_or_no_contact_gives_none() -> None:
    conv = conversations("conversations_page1.json")[0]
    no_messages = msgspec.structs.replace(conv, messages=msgspec.structs.replace(conv.messages, data=[]))
    assert conversation_to_record(no_messages, PAGE) is None
    only_page = msgspec.structs.replace(
        conv,
        participants=msgspec.structs.replace(
            conv.participants,
            data=[p for p in conv.participants.data if p.id == PAGE],
        ),
    )
    assert conversation_to_record(only_page, PAGE) is None
