"""Webhook bodies from fixtures/webhooks/: decoding, and the records they become."""

from __future__ import annotations

import json

import msgspec
import pytest

from core.records import EVENT_TYPES, attachment_label
from tests.helpers.webhook import (
    FIXTURE_OUTCOMES,
    MID1,
    MID3,
    PAGE,
    PAGE2,
    WEBHOOKS,
    A,
    B,
    C,
    fixture,
    item_body,
    nested_body,
)
from tests.helpers.webhook import only_event as only
from tests.helpers.webhook import parse_fixture as parse
from webhook.parse import (
    InvalidWebhook,
    decode_webhook,
    read_webhook,
    webhook_records,
)

FIXTURES = WEBHOOKS
ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.json"))


def test_every_fixture_is_described() -> None:
    assert ALL_FIXTURES == sorted(FIXTURE_OUTCOMES)
    assert "invalid_timestamp.json" not in ALL_FIXTURES  # a numeric string is readable now


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_every_fixture_decodes_with_the_schema(name: str) -> None:
    raw = fixture(name)
    raw.decode("ascii")  # Meta escapes non-ASCII as \uXXXX
    outcome = FIXTURE_OUTCOMES[name]
    if outcome.status == "invalid":
        with pytest.raises(msgspec.ValidationError):
            decode_webhook(raw)
        with pytest.raises(InvalidWebhook):
            read_webhook(raw)
        return
    body = decode_webhook(raw)
    parsed = webhook_records(body)
    assert sorted(e.event_type for _, r in parsed.items for e in r.events) == list(outcome.events)
    assert parsed.unknown == outcome.unknown
    assert len(parsed.skipped) == outcome.skipped
    assert all(" - at `$.entry[" in reason for reason in parsed.skipped)
    if outcome.status == "ignored":
        assert parsed.pages == [] and parsed.items == []
    else:
        assert parsed.pages and set(parsed.pages) <= {PAGE, PAGE2}
    for page, record in parsed.items:
        assert page.isdigit()
        assert record.sender_id.isdigit() and record.sender_id != page
        assert record.facebook_conversation_id is None
        assert record.sender_name is None
        assert record.message_count is None and record.unread_count is None
        for event in record.events:
            assert event.event_type in EVENT_TYPES
            assert 10**12 < event.event_timestamp < 10**13  # milliseconds, whatever was sent
            # payloads are stored as JSON: they must survive a round trip unchanged
            assert json.loads(json.dumps(event.payload)) == event.payload


def test_outer_shape_failure_names_its_path() -> None:
    with pytest.raises(InvalidWebhook) as info:
        read_webhook(fixture("invalid_outer_shape.json"))
    assert str(info.value) == "Invalid webhook body: Expected `array`, got `object` - at `$.entry`"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "Malformed webhook body: JSON is malformed"),
        (b"", "Malformed webhook body: Input data was truncated"),
        (b"[]", "Invalid webhook body: Expected `object`, got `array` - at `$`"),
        (b'{"entry": []}', "Invalid webhook body: Object missing required field `object` - at `$`"),
        (b'{"object": 7, "entry": []}', "Invalid webhook body: Expected `str`, got `int` - at `$.object`"),
        (
            b'{"object": "page", "entry": [7]}',
            "Invalid webhook body: Expected `object`, got `int` - at `$.entry[0]`",
        ),
        (
            b'{"object": "page", "entry": [{"time": 1}]}',
            "Invalid webhook body: Object missing required field `id` - at `$.entry[0]`",
        ),
        (
            b'{"object": "page", "entry": [{"id": "1", "messaging": {}}]}',
            "Invalid webhook body: Expected `array`, got `object` - at `$.entry[0].messaging`",
        ),
        (
            b'{"object": "page", "entry": [{"id": 1.5}]}',
            "Invalid webhook body: Expected `int | str`, got `float` - at `$.entry[0].id`",
        ),
    ],
)
def test_unreadable_bodies_are_invalid_with_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidWebhook) as info:
        read_webhook(raw)
    assert str(info.value).startswith(reason)


def test_deep_nesting_is_invalid_not_a_recursion_error() -> None:
    with pytest.raises(InvalidWebhook) as info:
        read_webhook(nested_body(100_000))
    assert "nested too deeply" in str(info.value)


def test_other_objects_are_not_read_past_the_envelope() -> None:
    parsed = read_webhook(b'{"object": "user", "entry": {"not": "a list"}}')
    assert (parsed.object, parsed.items, parsed.pages) == ("user", [], [])
    parsed = parse("object_instagram.json")
    assert parsed.object == "instagram" and parsed.items == []


def test_message_text() -> None:
    page, record, event = only("message_text.json")
    assert page == PAGE
    assert record.sender_id == A
    assert event.event_type == "message_received"
    assert (event.message_id or "").startswith("m_AbC")
    assert event.content == "Hola, ¿cómo estás? 👋"
    assert event.event_timestamp == 1732899999876
    assert event.payload == {}
    assert record.last_message == "Hola, ¿cómo estás? 👋"
    assert record.last_message_time == 1732899999876


def test_message_attachment() -> None:
    _, record, event = only("message_attachment.json")
    assert record.sender_id == A
    assert event.event_type == "message_received"
    assert event.content == "[image]"
    assert event.payload["attachments"][0]["type"] == "image"
    assert event.payload["attachments"][0]["payload"]["url"].startswith("https://scontent.xx.fbcdn.net/")
    assert event.payload["reply_to"]["mid"].startswith("m_AbCdEf")
    assert record.last_message == "[image]"


def test_echo_belongs_to_the_recipient() -> None:
    page, record, event = only("message_echo.json")
    assert page == PAGE
    assert record.sender_id == A  # the recipient, not the page that sent it
    assert event.event_type == "message_sent"
    assert (event.message_id or "").startswith("m_AbC3")
    assert event.content == "¡Hola! Te respondemos en unos minutos."
    assert event.payload == {"app_id": "1517776481860111", "metadata": "crm:ticket-4821"}  # ids are strings
    assert record.last_message_time == event.event_timestamp


def test_delivery() -> None:
    _, record, event = only("delivery.json")
    assert record.sender_id == A
    assert event.event_type == "message_delivered"
    assert event.message_id is None
    assert event.content is None
    assert event.payload == {
        "mids": [MID3],
        "watermark": 1732900059876,
    }
    assert record.last_message is None and record.last_message_time is None


def test_read() -> None:
    _, record, event = only("read.json")
    assert event.event_type == "message_read"
    assert event.message_id is None
    assert event.payload == {"watermark": 1732900059876}
    assert event.event_timestamp == 1732900075197
    assert record.last_message_time is None


def test_reaction_react() -> None:
    _, record, event = only("reaction_react.json")
    assert record.sender_id == A
    assert event.event_type == "reaction"
    assert event.message_id is None
    assert event.payload == {
        "mid": MID3,
        "action": "react",
        "reaction": "love",
        "emoji": "\u2764\ufe0f",
    }


def test_reaction_unreact_without_emoji() -> None:
    _, _, event = only("reaction_unreact.json")
    assert event.event_type == "reaction"
    assert event.message_id is None
    assert event.payload["action"] == "unreact"
    assert event.payload["mid"].startswith("m_AbC3")
    assert event.payload["reaction"] is None and event.payload["emoji"] is None


def test_postback() -> None:
    _, record, event = only("postback.json")
    assert record.sender_id == B
    assert event.event_type == "postback"
    assert (event.message_id or "").startswith("m_AbC4")
    assert event.content == "Empezar"
    assert event.payload == {
        "payload": "GET_STARTED",
        "title": "Empezar",
        "referral": {
            "ref": "summer-promo",
            "source": "SHORTLINK",
            "type": "OPEN_THREAD",
        },
    }
    assert record.last_message is None  # a postback is not a message


def test_referral() -> None:
    _, record, event = only("referral.json")
    assert record.sender_id == B
    assert event.event_type == "referral"
    assert event.message_id is None
    assert event.payload["ref"] == "winter-sale"
    assert event.payload["source"] == "ADS"
    assert event.payload["ad_id"] == "120210987654321098"
    assert event.payload["ads_context_data"]["ad_title"] == "Rebajas de invierno"


def test_optin() -> None:
    _, record, event = only("optin.json")
    assert record.sender_id == B
    assert event.event_type == "optin"
    assert event.message_id is None
    assert event.payload["type"] == "notification_messages"
    assert event.payload["payload"] == "WEEKLY_DEALS"
    assert event.payload["notification_messages_token"] == "7382619203847561234"
    assert "user_ref" not in event.payload  # absent fields are not stored as nulls


def test_message_edit() -> None:
    _, record, event = only("message_edit.json")
    assert record.sender_id == A
    assert event.event_type == "message_edited"
    assert event.message_id is None
    assert event.payload == {
        "mid": MID1,
        "text": "Hola, ¿cómo estáis? 👋",
        "num_edit": 1,
    }
    assert record.last_message is None  # an edit is not a new message


def test_standby_is_processed() -> None:
    parsed = parse("standby.json")
    assert parsed.unknown == 0
    [(page, record)] = parsed.items
    assert page == PAGE and record.sender_id == C
    assert [e.event_type for e in record.events] == ["message_received", "message_sent"]
    assert record.events[1].payload["app_id"] == "263902037430900"
    assert record.last_message == "Sí, en 3\u20135 días."


def test_batch_groups_by_page_and_contact_in_arrival_order() -> None:
    parsed = parse("batch_two_entries.json")
    assert parsed.unknown == 0
    summary = {(page, r.sender_id): [e.event_type for e in r.events] for page, r in parsed.items}
    assert summary == {
        (PAGE, A): [
            "message_received",
            "message_sent",
            "message_delivered",
            "message_read",
        ],
        (PAGE, B): ["message_received"],
        (PAGE2, A): ["message_received"],
        (PAGE2, C): ["reaction"],
    }
    assert [(page, r.sender_id) for page, r in parsed.items] == [
        (PAGE, A),
        (PAGE, B),
        (PAGE2, A),
        (PAGE2, C),
    ]
    records = {(page, r.sender_id): r for page, r in parsed.items}
    assert records[(PAGE, B)].events[0].payload == {"quick_reply": {"payload": "PLAN_ANNUAL"}}
    assert records[(PAGE2, C)].last_message is None


def test_last_message_is_the_newest_message_event() -> None:
    records = {(p, r.sender_id): r for p, r in parse("batch_two_entries.json").items}
    a = records[(PAGE, A)]
    # the echo (t+60s) is newer than the user's message (t); delivery/read are not
    # messages
    assert a.last_message == "¡Hola! Te respondemos en unos minutos."
    assert a.last_message_time == 1732899999876 + 60000


def test_last_message_ignores_arrival_order() -> None:
    older = {
        "sender": {"id": A},
        "recipient": {"id": PAGE},
        "timestamp": 1_732_900_002_000,
        "message": {"mid": "m_old", "text": "old"},
    }
    newer = {
        "sender": {"id": A},
        "recipient": {"id": PAGE},
        "timestamp": 1_732_900_003_000,
        "message": {"mid": "m_new", "text": "new"},
    }
    [(_, record)] = read_webhook(item_body(newer, older)).items
    assert [e.message_id for e in record.events] == ["m_new", "m_old"]
    assert (record.last_message, record.last_message_time) == ("new", 1_732_900_003_000)


def test_unknown_kinds_are_counted_not_errors() -> None:
    parsed = parse("unknown_kind.json")
    assert parsed.unknown == 1
    [(page, record)] = parsed.items
    assert page == PAGE
    assert [e.event_type for e in record.events] == ["message_received"]


def test_item_without_contact_id_is_counted() -> None:
    body = {
        "object": "page",
        "entry": [
            {
                "id": PAGE,
                "time": 1,
                "messaging": [
                    # checkbox plugin opt-in: the user is known only by a user_ref
                    {
                        "recipient": {"id": PAGE},
                        "timestamp": 1,
                        "optin": {"ref": "r", "user_ref": "ur-1"},
                    },
                    {
                        "sender": {"user_ref": "ur-1"},
                        "recipient": {"id": PAGE},
                        "timestamp": 2,
                        "optin": {"ref": "r"},
                    },
                ],
            }
        ],
    }
    parsed = webhook_records(decode_webhook(json.dumps(body).encode()))
    assert parsed.items == [] and parsed.unknown == 2


def test_items_are_attributed_to_the_entry_page() -> None:
    item = {
        "sender": {"id": A},
        "recipient": {"id": "999"},
        "timestamp": 5,
        "message": {"mid": "m_x", "text": "x"},
    }
    body = {"object": "page", "entry": [{"id": PAGE, "time": 6, "messaging": [item]}]}
    [(page, record)] = webhook_records(decode_webhook(json.dumps(body).encode())).items
    assert page == PAGE and record.sender_id == A


def test_same_page_across_entries_merges_and_duplicates_collapse() -> None:
    msg = {
        "sender": {"id": A},
        "recipient": {"id": PAGE},
        "timestamp": 5,
        "message": {"mid": "m_x", "text": "x"},
    }
    read = {
        "sender": {"id": A},
        "recipient": {"id": PAGE},
        "timestamp": 7,
        "read": {"watermark": 6},
    }
    body = {
        "object": "page",
        "entry": [
            {"id": PAGE, "time": 6, "messaging": [msg]},
            {"id": PAGE, "time": 8, "messaging": [msg, read], "standby": [read]},
        ],
    }
    parsed = webhook_records(decode_webhook(json.dumps(body).encode()))
    [(_, record)] = parsed.items
    assert [e.event_type for e in record.events] == ["message_received", "message_read"]


def test_unknown_fields_are_ignored() -> None:
    item = {
        "sender": {"id": A, "new_field": 1},
        "recipient": {"id": PAGE},
        "timestamp": 5,
        "message": {
            "mid": "m_x",
            "text": "x",
            "nlp": {"entities": {}},
            "commands": [{"name": "flights"}],
        },
        "brand_new": {"a": [1, 2]},
    }
    body = {
        "object": "page",
        "entry": [{"id": PAGE, "time": 6, "messaging": [item], "changes": []}],
        "extra": True,
    }
    [(_, record)] = webhook_records(decode_webhook(json.dumps(body).encode())).items
    assert record.events[0].content == "x"


def test_attachment_label() -> None:
    assert attachment_label([]) is None
    assert attachment_label(["video"]) == "[video]"
    assert attachment_label(["image", "image"]) == "[2 images]"
    assert attachment_label(["image", "file"]) == "[2 attachments]"
