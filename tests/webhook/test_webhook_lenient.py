"""Webhook bodies read the way Meta really sends them (SPEC semantics 10), item by item."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.helpers.webhook import (
    BIG_PSID,
    MID1,
    MID3,
    PAGE,
    A,
    C,
    fixture,
    item_body,
)
from tests.helpers.webhook import only_event as only
from tests.helpers.webhook import parse_fixture as parse
from webhook.parse import read_webhook

# ---- read as Meta really sends it (SPEC semantics 10) -------------------------------------------


def _message(**fields: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "sender": {"id": A},
        "recipient": {"id": PAGE},
        "timestamp": 1_732_900_000_000,
        "message": {"mid": "m_x", "text": "x"},
    }
    item.update(fields)
    return item


def test_ids_sent_as_numbers_are_exact_strings() -> None:
    assert str(int(float(BIG_PSID))) != BIG_PSID  # what reading it as a float would do
    parsed = parse("ids_as_numbers.json")
    [(page, record)] = parsed.items
    assert page == PAGE
    assert record.sender_id == BIG_PSID
    received, sent = record.events
    assert (received.event_type, sent.event_type) == ("message_received", "message_sent")
    assert sent.payload == {"app_id": "1517776481860111"}


def test_timestamps_in_seconds_or_strings_become_milliseconds() -> None:
    assert only("timestamp_seconds.json")[2].event_timestamp == 1_732_900_300_000
    assert only("timestamp_string.json")[2].event_timestamp == 1_732_900_400_276
    _, record, event = only("message_text.json")
    assert event.event_timestamp == record.last_message_time == 1_732_899_999_876  # ms stay ms


def test_a_missing_timestamp_takes_the_watermark_or_the_entry_time() -> None:
    _, _, delivery = only("delivery_without_timestamp.json")
    assert delivery.event_timestamp == 1_732_900_059_876  # Meta's own example: the watermark
    assert delivery.payload == {"mids": [MID3], "watermark": 1_732_900_059_876}
    assert only("item_without_timestamp.json")[2].event_timestamp == 1_732_900_500_276
    item = _message()
    del item["timestamp"]
    [(_, record)] = read_webhook(item_body(item, time=1_732_900_600)).items  # entry time in seconds
    assert record.events[0].event_timestamp == 1_732_900_600_000


def test_an_item_with_no_time_at_all_is_skipped() -> None:
    item = _message()
    del item["timestamp"]
    parsed = read_webhook(item_body(item, _message(message={"mid": "m_y", "text": "y"}), time=None))
    assert [e.message_id for _, r in parsed.items for e in r.events] == ["m_y"]
    [reason] = parsed.skipped
    assert reason.endswith("- at `$.entry[0].messaging[0]`")
    item_time = read_webhook(item_body(item, time="soon"))
    assert item_time.items == [] and item_time.skipped[0].endswith("- at `$.entry[0].time`")


@pytest.mark.parametrize(
    "value",
    [
        10**30,
        2**63,
        -5,
        1.5,
        True,
        {"ms": 1},
        "",
        "soon",
        "12.5",
        "-5",
        "9" * 25,
        "\uff11\uff12",
        "\u0661\u0662",
    ],
)
def test_unreadable_timestamps_skip_their_item_only(value: Any) -> None:
    parsed = read_webhook(
        item_body(_message(timestamp=value), _message(message={"mid": "m_ok", "text": "ok"}))
    )
    assert [e.message_id for _, r in parsed.items for e in r.events] == ["m_ok"]
    [reason] = parsed.skipped
    assert reason.endswith("- at `$.entry[0].messaging[0].timestamp`"), reason


def test_a_null_timestamp_is_an_absent_one() -> None:
    parsed = read_webhook(item_body(_message(timestamp=None), time=1_732_900_700_000))
    assert parsed.skipped == []
    assert parsed.items[0][1].events[0].event_timestamp == 1_732_900_700_000


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("sender", {"id": 2**63}, "sender.id"),
        ("sender", {"id": 1.5}, "sender.id"),
        ("recipient", {"id": [1]}, "recipient.id"),
        ("message", {"mid": "m_x", "text": 42}, "message.text"),
        ("message", {"text": "no mid"}, "message"),
        ("message", {"mid": "m_x", "app_id": 10**20, "is_echo": True}, "message.app_id"),
        ("message_edit", {"mid": "m_x", "num_edit": "two"}, "message_edit.num_edit"),
        ("read", {"watermark": "later"}, "read.watermark"),
        ("reaction", {"action": "react"}, "reaction"),
        ("optin", {"token_expiry_timestamp": 10**30}, "optin.token_expiry_timestamp"),
    ],
)
def test_an_unreadable_item_is_skipped_with_its_path(field: str, value: Any, path: str) -> None:
    bad = _message(**{field: value})
    if field not in ("sender", "recipient", "message"):
        del bad["message"]
    parsed = read_webhook(item_body(_message(message={"mid": "m_ok", "text": "ok"}), bad))
    assert [e.message_id for _, r in parsed.items for e in r.events] == ["m_ok"]
    [reason] = parsed.skipped
    assert reason.endswith(f"- at `$.entry[0].messaging[1].{path}`".replace(".`", "`")), reason
    assert parsed.pages == [PAGE]


def test_out_of_range_values_are_skipped_items() -> None:
    parsed = parse("invalid_out_of_range.json")
    assert [e.event_type for _, r in parsed.items for e in r.events] == ["message_read"]
    assert [reason.rsplit(" - at ", 1)[1] for reason in parsed.skipped] == [
        "`$.entry[0].messaging[0].timestamp`",
        "`$.entry[0].messaging[1].sender.id`",
        "`$.entry[0].messaging[2].timestamp`",
    ]


def test_num_edit_as_a_string() -> None:
    _, _, event = only("message_edit_num_edit_string.json")
    assert event.payload == {"mid": MID1, "text": "Hola, ¿qué tal?", "num_edit": 2}


def test_read_with_a_mid_instead_of_a_watermark() -> None:
    _, record, event = only("read_with_mid.json")
    assert record.sender_id == A
    assert (event.event_type, event.message_id, event.payload) == ("message_read", None, {"mid": MID3})


def test_standby_postback_without_payload() -> None:
    _, record, event = only("standby_postback_without_payload.json")
    assert record.sender_id == C
    assert event.event_type == "postback" and (event.message_id or "").startswith("m_Pb1")
    assert event.payload == {"payload": None, "title": "Empezar"}


def test_echo_without_app_id() -> None:
    _, record, event = only("echo_without_app_id.json")
    assert record.sender_id == A and event.event_type == "message_sent"
    assert event.payload == {}
    assert record.last_message == "Enviado desde la bandeja de entrada"


@pytest.mark.parametrize(
    "name", ["optin_checkbox_user_ref.json", "policy_enforcement.json", "handover_app_roles.json"]
)
def test_items_without_a_sender_are_unknown(name: str) -> None:
    parsed = parse(name)
    assert (parsed.items, parsed.unknown, parsed.skipped, parsed.pages) == ([], 1, [], [PAGE])


def test_dashboard_test_ping_is_no_page_item() -> None:
    parsed = parse("changes_test_ping.json")
    assert (parsed.items, parsed.pages, parsed.unknown, parsed.skipped) == ([], [], 1, [])


def test_the_same_mid_twice_is_one_event() -> None:
    _, record, event = only("duplicate_mid.json")
    assert event.content == "Twice"


def test_unsend_is_a_deleted_event_that_names_the_original() -> None:
    parsed = parse("message_unsend.json")
    [(page, record)] = parsed.items
    [event] = record.events
    assert (event.event_type, event.message_id, event.content) == ("message_deleted", None, None)
    assert event.payload == {"mid": MID1}
    assert event.event_timestamp == 1_732_900_700_276
    assert parsed.unsent == [(PAGE, A, MID1)]
    assert record.last_message is None and record.last_message_time is None  # not a message


@pytest.mark.parametrize(
    ("name", "kind", "content"),
    [
        ("attachment_audio.json", "audio", "[audio]"),
        ("attachment_video.json", "video", "[video]"),
        ("attachment_file.json", "file", "[file]"),
        ("attachment_location.json", "location", "[location]"),
        ("attachment_fallback.json", "fallback", "Mira esto"),
        ("attachment_template.json", "template", "[template]"),
        ("attachment_sticker.json", "image", "[sticker]"),
        ("message_attachment.json", "image", "[image]"),
    ],
)
def test_attachments_of_every_type_are_kept(name: str, kind: str, content: str) -> None:
    _, record, event = only(name)
    attachments = event.payload["attachments"]
    assert attachments[0]["type"] == kind
    assert event.content == record.last_message == content
    raw = json.loads(fixture(name))["entry"][0]["messaging"][0]["message"]["attachments"]
    assert [a["payload"] for a in attachments] == [a["payload"] for a in raw]  # kept as sent


def test_attachment_details() -> None:
    location = only("attachment_location.json")[2].payload["attachments"][0]
    assert location["payload"] == {"coordinates": {"lat": 40.416775, "long": -3.70379}}
    assert location["title"] == "Ubicación de María" and location["url"].startswith("https://l.facebook")
    fallback = only("attachment_fallback.json")[2].payload["attachments"][0]
    assert fallback == {
        "type": "fallback",
        "payload": None,
        "title": "Rebajas de invierno",
        "url": "https://example.com/rebajas",
    }
    template = only("attachment_template.json")[2]
    assert template.payload["attachments"][0]["payload"]["template_type"] == "generic"
    assert template.payload["app_id"] == "1517776481860111"
    sticker = only("attachment_sticker.json")[2]
    assert sticker.payload["sticker_id"] == "369239263222822"
    assert [a["type"] for a in sticker.payload["attachments"]] == ["image", "sticker"]


def test_quick_reply_and_reply_to_are_kept() -> None:
    _, _, event = only("message_quick_reply.json")
    assert event.payload == {"quick_reply": {"payload": "PLAN_ANNUAL"}, "reply_to": {"mid": MID3}}


def test_a_referral_of_a_postback_is_kept() -> None:
    _, _, event = only("postback.json")
    assert event.payload["referral"]["source"] == "SHORTLINK"


@pytest.mark.parametrize(
    "name",
    [
        "handover_pass_thread_control.json",
        "handover_take_thread_control.json",
        "handover_request_thread_control.json",
        "handover_app_roles.json",
        "payment.json",
    ],
)
def test_handovers_and_payments_are_unknown_kinds(name: str) -> None:
    parsed = parse(name)
    assert (parsed.items, parsed.unknown, parsed.skipped) == ([], 1, [])
