"""Meta's bodies as they really come, through the API on both engines: sign, POST, drain, read rows.

Every fixture of fixtures/webhooks/ is posted and applied; what it becomes (inbox status, events
stored, items counted or skipped) is the table in ``tests.helpers.webhook.FIXTURE_OUTCOMES``.
The other tests look at the rows each case leaves (SPEC semantics 10).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.helpers import register_page
from tests.helpers.webhook import (
    BIG_PSID,
    FIXTURE_OUTCOMES,
    MID1,
    PAGE,
    PAGE2,
    A,
    all_events,
    conversations,
    drain,
    events,
    fixture,
    inbox,
    inbox_rows,
    item_body,
    message_body,
    post,
)


def register_both(client: TestClient) -> tuple[dict[str, Any], dict[str, Any]]:
    return register_page(client, fb_page_id=PAGE), register_page(client, fb_page_id=PAGE2)


def post_and_drain(client: TestClient, name: str) -> Any:
    response = post(client, fixture(name))
    assert response.status_code == 200, response.text
    assert response.text == "EVENT_RECEIVED"
    return drain(client)


def only_event(client: TestClient, page_id: str) -> dict[str, Any]:
    [event] = all_events(client, page_id)
    return event


@pytest.mark.parametrize("name", sorted(FIXTURE_OUTCOMES))
def test_every_fixture_is_acknowledged_and_applied_as_described(wclient: TestClient, name: str) -> None:
    outcome = FIXTURE_OUTCOMES[name]
    first, second = register_both(wclient)
    summary = post_and_drain(wclient, name)
    assert inbox(wclient) == {outcome.status: 1}
    stored = all_events(wclient, first["pageId"]) + all_events(wclient, second["pageId"])
    assert sorted(e["eventType"] for e in stored) == list(outcome.events)
    assert (summary.unknown_items, summary.skipped_items, summary.failed) == (
        outcome.unknown,
        outcome.skipped,
        0,
    )
    [row] = inbox_rows(wclient)
    if outcome.status == "invalid" or outcome.skipped:
        assert " - at `$" in row["error"]
        assert row["error"].count(" - at `$") == max(1, outcome.skipped)
    else:
        assert row["error"] is None
    assert (row["applied_at"] is not None) == (outcome.status == "applied")


@pytest.mark.parametrize(
    "name",
    ["handover_pass_thread_control.json", "payment.json", "message_text.json", "invalid_item_type.json"],
)
def test_ignored_means_no_registered_page(wclient: TestClient, name: str) -> None:
    register_page(wclient, fb_page_id="999999999999999")
    post_and_drain(wclient, name)
    assert inbox(wclient) == {"ignored": 1}


def test_a_body_of_unknown_kinds_only_is_applied_with_nothing_written(wclient: TestClient) -> None:
    page = register_page(wclient)
    summary = post_and_drain(wclient, "handover_take_thread_control.json")
    assert (summary.applied, summary.ignored, summary.unknown_items) == (1, 0, 1)
    assert summary.counts.events_inserted == 0
    assert conversations(wclient, page["pageId"]) == []
    assert "webhook_unknown_items_total 1.0" in wclient.get("/metrics").text


def test_ids_sent_as_numbers_stay_exact(wclient: TestClient) -> None:
    page = register_page(wclient)
    post_and_drain(wclient, "ids_as_numbers.json")
    [conv] = conversations(wclient, page["pageId"])
    assert conv["senderId"] == BIG_PSID  # above 2**53, digit for digit
    received, sent = sorted(events(wclient, conv["id"]), key=lambda e: e["eventTimestamp"])
    assert sent["payload"] == {"app_id": "1517776481860111"}
    assert (received["eventType"], sent["eventType"]) == ("message_received", "message_sent")
    # The same contact as a string id lands on the same conversation.
    assert (
        post(
            wclient, message_body("m_as_string", "as a string", 1_732_900_009_000, sender=BIG_PSID)
        ).status_code
        == 200
    )
    drain(wclient)
    [again] = conversations(wclient, page["pageId"])
    assert (again["id"], again["messageCount"]) == (conv["id"], 3)


@pytest.mark.parametrize(
    ("name", "timestamp"),
    [
        ("timestamp_seconds.json", 1_732_900_300_000),
        ("timestamp_string.json", 1_732_900_400_276),
        ("item_without_timestamp.json", 1_732_900_500_276),
        ("delivery_without_timestamp.json", 1_732_900_059_876),
    ],
)
def test_timestamps_are_stored_in_milliseconds(wclient: TestClient, name: str, timestamp: int) -> None:
    page = register_page(wclient)
    post_and_drain(wclient, name)
    assert only_event(wclient, page["pageId"])["eventTimestamp"] == timestamp
    [conv] = conversations(wclient, page["pageId"])
    if name != "delivery_without_timestamp.json":
        assert conv["lastMessageTime"] == timestamp


def test_unsend_keeps_the_row_and_drops_its_content(wclient: TestClient) -> None:
    page = register_page(wclient)
    post_and_drain(wclient, "message_text.json")
    [conv] = conversations(wclient, page["pageId"])
    assert conv["lastMessage"] == "Hola, ¿cómo estás? 👋"
    post_and_drain(wclient, "message_unsend.json")
    assert inbox(wclient) == {"applied": 2}
    stored = {e["eventType"]: e for e in events(wclient, conv["id"])}
    assert set(stored) == {"message_received", "message_deleted"}
    original, unsend = stored["message_received"], stored["message_deleted"]
    assert original["messageId"] == MID1 and original["content"] is None
    assert original["payload"] == {"is_deleted": True}
    assert (unsend["messageId"], unsend["content"], unsend["payload"]) == (None, None, {"mid": MID1})
    [after] = conversations(wclient, page["pageId"])
    assert after["lastMessage"] is None  # the preview was the unsent message
    assert after["messageCount"] == 1 and after["version"] > conv["version"]
    # Meta redelivers the message: its content does not come back, nothing doubles.
    post(wclient, fixture("message_text.json").replace(b'"time":1732900000276', b'"time":1732900000277'))
    drain(wclient)
    assert sorted(e["content"] is None for e in events(wclient, conv["id"])) == [True, True]


def test_message_and_its_unsend_in_one_batch(wclient: TestClient) -> None:
    page = register_page(wclient)
    assert post(wclient, fixture("message_text.json")).status_code == 200
    assert post(wclient, fixture("message_unsend.json")).status_code == 200
    assert drain(wclient).applied == 2
    [conv] = conversations(wclient, page["pageId"])
    stored = {e["eventType"]: e for e in events(wclient, conv["id"])}
    assert stored["message_received"]["content"] is None
    assert conv["lastMessage"] is None


def test_unsend_touches_only_its_own_message(wclient: TestClient) -> None:
    page = register_page(wclient)
    post(wclient, message_body("m_keep", "kept", 1_732_900_000_000))
    post(wclient, message_body(MID1, "to be unsent", 1_732_900_001_000))
    drain(wclient)
    post_and_drain(wclient, "message_unsend.json")
    [conv] = conversations(wclient, page["pageId"])
    contents = {e["messageId"]: e["content"] for e in events(wclient, conv["id"])}
    assert contents == {"m_keep": "kept", MID1: None, None: None}
    assert conv["lastMessage"] is None  # the newest message was the unsent one


def test_the_same_mid_twice_is_one_event(wclient: TestClient) -> None:
    page = register_page(wclient)
    post_and_drain(wclient, "duplicate_mid.json")
    [conv] = conversations(wclient, page["pageId"])
    assert conv["messageCount"] == 1
    assert [e["content"] for e in events(wclient, conv["id"])] == ["Twice"]


@pytest.mark.parametrize(
    "name",
    [
        "attachment_audio.json",
        "attachment_video.json",
        "attachment_file.json",
        "attachment_location.json",
        "attachment_fallback.json",
        "attachment_template.json",
        "attachment_sticker.json",
        "message_attachment.json",
    ],
)
def test_attachments_are_kept_in_the_payload(wclient: TestClient, name: str) -> None:
    page = register_page(wclient)
    post_and_drain(wclient, name)
    event = only_event(wclient, page["pageId"])
    sent = json.loads(fixture(name))["entry"][0]["messaging"][0]["message"]["attachments"]
    assert [(a["type"], a["payload"]) for a in event["payload"]["attachments"]] == [
        (a["type"], a["payload"]) for a in sent
    ]
    assert event["content"]  # a label when there is no text: "[audio]", "[sticker]", ...


def test_sticker_quick_reply_reply_to_and_postback_referral(wclient: TestClient) -> None:
    page = register_page(wclient)
    for name in ("attachment_sticker.json", "message_quick_reply.json", "postback.json"):
        post(wclient, fixture(name))
    drain(wclient)
    by_type = {(e["eventType"], e["content"]): e["payload"] for e in all_events(wclient, page["pageId"])}
    assert by_type[("message_received", "[sticker]")]["sticker_id"] == "369239263222822"
    quick = by_type[("message_received", "Plan anual")]
    assert quick["quick_reply"] == {"payload": "PLAN_ANNUAL"} and quick["reply_to"]["mid"].startswith(
        "m_AbC3"
    )
    assert by_type[("postback", "Empezar")]["referral"]["ref"] == "summer-promo"


def test_standby_postback_without_payload_and_echo_without_app_id(wclient: TestClient) -> None:
    page = register_page(wclient)
    post(wclient, fixture("standby_postback_without_payload.json"))
    post(wclient, fixture("echo_without_app_id.json"))
    drain(wclient)
    assert inbox(wclient) == {"applied": 2}
    stored = {e["eventType"]: e for e in all_events(wclient, page["pageId"])}
    assert stored["postback"]["payload"] == {"payload": None, "title": "Empezar"}
    assert stored["message_sent"]["payload"] == {}


def test_edits_and_reads_as_they_come(wclient: TestClient) -> None:
    page = register_page(wclient)
    post(wclient, fixture("message_edit_num_edit_string.json"))
    post(wclient, fixture("read_with_mid.json"))
    drain(wclient)
    stored = {e["eventType"]: e for e in all_events(wclient, page["pageId"])}
    assert stored["message_edited"]["payload"]["num_edit"] == 2
    assert stored["message_read"]["payload"]["mid"].startswith("m_AbC3")


def test_skipped_items_are_listed_on_an_applied_row(wclient: TestClient) -> None:
    page = register_page(wclient)
    summary = post_and_drain(wclient, "invalid_out_of_range.json")
    assert (summary.applied, summary.skipped_items) == (1, 3)
    [row] = inbox_rows(wclient)
    assert row["status"] == "applied"
    assert row["error"].startswith("3 item(s) skipped: ")
    for path in ("messaging[0].timestamp", "messaging[1].sender.id", "messaging[2].timestamp"):
        assert f"`$.entry[0].{path}`" in row["error"]
    assert [e["eventType"] for e in all_events(wclient, page["pageId"])] == ["message_read"]
    assert "webhook_skipped_items_total 3.0" in wclient.get("/metrics").text


def test_out_of_range_values_never_fail_a_row(wclient: TestClient) -> None:
    page = register_page(wclient)
    big = {"sender": {"id": A}, "recipient": {"id": PAGE}, "message": {"mid": "m_big", "text": "x"}}
    bodies = [
        item_body({**big, "timestamp": 10**30}),
        item_body({**big, "timestamp": 2**63}),
        item_body({**big, "timestamp": "9" * 30}),
        item_body({**big, "timestamp": 1_732_900_000_000, "message": {"mid": "m_big", "app_id": 2**64}}),
        item_body({**big, "timestamp": 1_732_900_000_000}, time=10**30),
    ]
    for body in bodies:
        assert post(wclient, body).status_code == 200
    summary = drain(wclient)
    assert (summary.failed, summary.invalid, summary.applied) == (0, 0, 5)
    assert summary.skipped_items == 4  # the last one's item has its own timestamp: written
    assert [e["messageId"] for e in all_events(wclient, page["pageId"])] == ["m_big"]


def test_nul_in_ids_mids_and_text_never_fails_a_row(wclient: TestClient) -> None:
    """PostgreSQL text cannot hold U+0000: such a body is applied with it removed, on both engines."""
    page = register_page(wclient)
    ts = 1_732_900_000_000
    message = {"sender": {"id": A + "\x00"}, "recipient": {"id": PAGE}, "timestamp": ts}
    body = item_body({**message, "message": {"mid": "m_n\x00ul", "text": "a\x00b"}}, page=PAGE + "\x00")
    assert b"\\u0000" in body
    assert post(wclient, body).status_code == 200
    assert drain(wclient).applied == 1
    [conv] = conversations(wclient, page["pageId"])
    assert conv["senderId"] == A
    [event] = events(wclient, conv["id"])
    assert (event["messageId"], event["content"]) == ("m_nul", "ab")
    unsend = item_body({**message, "timestamp": ts + 1, "message": {"mid": "m_n\x00ul", "is_deleted": True}})
    assert post(wclient, unsend).status_code == 200
    assert drain(wclient).applied == 1
    assert inbox(wclient) == {"applied": 2}
    contents = {e["eventType"]: e["content"] for e in events(wclient, conv["id"])}
    assert contents == {"message_received": None, "message_deleted": None}


def test_a_row_names_the_first_skipped_items_only(wclient: TestClient) -> None:
    register_page(wclient)
    bad = [{"sender": {"id": A}, "timestamp": "never", "message": {"mid": f"m_{i}"}} for i in range(50)]
    assert post(wclient, item_body(*bad)).status_code == 200
    assert drain(wclient).skipped_items == 50
    [row] = inbox_rows(wclient)
    assert row["status"] == "applied"
    assert row["error"].startswith("50 item(s) skipped: ") and row["error"].endswith("; ...")
    assert row["error"].count(" - at `$") == 20
