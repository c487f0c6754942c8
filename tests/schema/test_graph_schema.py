"""Graph API responses from fixtures/graph/: every file decodes; bad records are skipped with a path."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from schema.graph import (
    Conversation,
    EnvelopeError,
    after_of_url,
    decode_app_usage,
    decode_business_usage,
    decode_conversation_list,
    decode_error,
    parse_graph_time,
)

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures" / "graph"
ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.json"))


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_fixtures_are_present() -> None:
    names = set(ALL_FIXTURES)
    for required in (
        "conversations_page1.json",
        "conversations_page2.json",
        "conversations_page_malformed.json",
        "conversations_incremental.json",
        "conversations_unknown_fields.json",
        "error_190.json",
        "error_4.json",
        "error_80006.json",
        "error_2.json",
        "error_1_reduce_data.json",
        "error_100_cursor.json",
        "error_10.json",
        "error_200.json",
    ):
        assert required in names


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_every_fixture_decodes(name: str) -> None:
    body = load(name)
    if name.startswith("error_"):
        error = decode_error(body)
        assert error is not None
        assert error.code > 0
        assert error.message
        assert error.fbtrace_id
        with pytest.raises(EnvelopeError):
            decode_conversation_list(body)
    else:
        listing = decode_conversation_list(body)
        assert decode_error(body) is None
        expected_skips = 2 if name == "conversations_page_malformed.json" else 0
        assert len(listing.skipped) == expected_skips
        for conv in listing.conversations:
            assert conv.id.startswith("t_")
            assert conv.updated_time.tzinfo is not None
            for message in conv.messages.data:
                assert message.id.startswith("m_")
                assert message.from_.id


def test_page1_fields_and_paging() -> None:
    listing = decode_conversation_list(load("conversations_page1.json"))
    assert [c.id for c in listing.conversations] == [
        "t_10161023456789012",
        "t_10161023456789377",
        "t_10160987654321098",
    ]
    first = listing.conversations[0]
    assert first.updated_time == datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert first.updated_time_ms == 1_748_779_200_000
    assert (first.message_count, first.unread_count) == (3, 1)
    contact = first.participants.data[0]
    assert contact.name == "Zo\u00eb \u00c5ngstr\u00f6m"  # written \u00eb in the file
    assert contact.email == "7234519876543210@facebook.com"
    assert first.messages.data[0].message == "Perfect, thank you \U0001f60a"
    assert listing.paging is not None and listing.paging.next is not None
    assert listing.next_cursor == listing.paging.cursors.after  # type: ignore[union-attr]
    assert listing.next_cursor is not None and listing.next_cursor.startswith("QVFIU")


def test_last_page_has_no_next_cursor() -> None:
    listing = decode_conversation_list(load("conversations_page2.json"))
    assert listing.paging is not None and listing.paging.cursors is not None
    assert listing.paging.cursors.after  # a cursor exists, but no next page
    assert listing.next_cursor is None
    assert decode_conversation_list(load("conversations_empty.json")).next_cursor is None
    assert not listing.has_next


def test_next_cursor_from_the_next_url_when_paging_has_no_cursors() -> None:
    listing = decode_conversation_list(load("conversations_next_only.json"))
    walk_1 = decode_conversation_list(load("conversations_walk_1.json"))
    assert listing.paging is not None and listing.paging.cursors is None
    assert listing.has_next and listing.next_cursor == walk_1.next_cursor
    broken = decode_conversation_list(load("conversations_next_without_after.json"))
    assert broken.has_next and broken.next_cursor is None  # a next page, no way to it


@pytest.mark.parametrize(
    ("url", "after"),
    [
        ("https://graph.facebook.com/v25.0/1/conversations?limit=25&after=QVFI%3D%3D", "QVFI=="),
        ("https://anywhere.example/x?after=&after=QVFIb", "QVFIb"),  # the first non-empty one
        ("/relative?after=c1", "c1"),
        ("https://graph.facebook.com/v25.0/1/conversations?limit=25", None),
        ("not a url at all", None),
        ("http://[::1", None),
    ],
)
def test_after_of_url(url: str, after: str | None) -> None:
    assert after_of_url(url) == after


def test_malformed_records_are_skipped_with_their_path() -> None:
    listing = decode_conversation_list(load("conversations_page_malformed.json"))
    assert [c.id for c in listing.conversations] == [
        "t_10161023456789012",
        "t_10160987654321098",
    ]
    assert listing.skipped == [
        (
            "$.data[1].messages.data[0].created_time",
            "Expected `datetime`, got `int` - at `$.data[1].messages.data[0].created_time`",
        ),
        ("$.data[2]", "Object missing required field `id` - at `$.data[2]`"),
    ]
    assert listing.next_cursor is not None  # the rest of the page is kept, paging too


def test_a_record_that_is_not_an_object_is_skipped_at_its_index() -> None:
    body = b'{"data": [12, {"id": "t_1", "updated_time": "2025-06-01T12:00:00+0000"}]}'
    listing = decode_conversation_list(body)
    assert [c.id for c in listing.conversations] == ["t_1"]
    assert listing.skipped == [("$.data[0]", "Expected `object`, got `int` - at `$.data[0]`")]


def test_a_time_without_offset_is_rejected() -> None:
    body = b'{"data": [{"id": "t_1", "updated_time": "2025-06-01T12:00:00"}]}'
    listing = decode_conversation_list(body)
    assert listing.conversations == []
    assert listing.skipped[0][0] == "$.data[0].updated_time"


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b"", b'{"data": 5}', b"[]", b'{"x": 1}'])
def test_a_body_that_is_not_a_listing_raises_envelope_error(body: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_conversation_list(body)


def test_unknown_fields_are_ignored() -> None:
    listing = decode_conversation_list(load("conversations_unknown_fields.json"))
    assert listing.skipped == []
    [conv] = listing.conversations
    strict = msgspec.json.decode(load("conversations_unknown_fields.json"))
    assert "is_subscribed" in strict["data"][0]  # the fixture does carry extra fields
    assert conv.id == "t_10161023456789377"
    newest = conv.messages.data[0]
    assert newest.attachments is not None
    assert newest.attachments.data[0]["mime_type"] == "image/jpeg"
    assert msgspec.structs.asdict(conv).keys() == {
        "id",
        "updated_time",
        "message_count",
        "unread_count",
        "participants",
        "messages",
    }


def test_error_bodies() -> None:
    error = decode_error(load("error_190.json"))
    assert error is not None
    assert (error.code, error.error_subcode, error.type) == (190, 463, "OAuthException")
    assert "Session has expired" in error.message
    reduce = decode_error(load("error_1_reduce_data.json"))
    assert reduce is not None and reduce.code == 1
    assert "reduce the amount of data" in reduce.message
    assert decode_error(b"not json") is None
    assert decode_error(load("conversations_page1.json")) is None


def test_usage_headers() -> None:
    app = decode_app_usage('{"call_count":28,"total_cputime":81,"total_time":25}')
    assert app is not None and app.percent == 81
    assert decode_app_usage(None) is None
    assert decode_app_usage("garbage") is None
    entries = decode_business_usage(
        '{"104325188712345":[{"type":"messenger","call_count":96,"total_cputime":12,'
        '"total_time":30,"estimated_time_to_regain_access":4}]}'
    )
    assert [(e.type, e.percent, e.estimated_time_to_regain_access) for e in entries] == [("messenger", 96, 4)]
    assert decode_business_usage("[1, 2]") == []


def test_parse_graph_time() -> None:
    assert parse_graph_time("2025-06-01T12:00:00+0000") == 1_748_779_200_000
    assert parse_graph_time("2025-06-01T14:00:00+0200") == 1_748_779_200_000
    assert parse_graph_time("1970-01-01T00:00:00.001+0000") == 1
    with pytest.raises(ValueError):
        parse_graph_time("2025-06-01T12:00:00")
    with pytest.raises(ValueError):
        parse_graph_time("yesterday")


def test_struct_and_parser_agree_on_times() -> None:
    raw = b'{"id": "t_1", "updated_time": "2025-06-01T12:00:00+0000"}'
    conv = msgspec.json.decode(raw, type=Conversation)
    assert conv.updated_time_ms == parse_graph_time("2025-06-01T12:00:00+0000")
