"""Webhook test helpers: signed bodies, posting, draining and reading back what was stored."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import msgspec
from starlette.testclient import TestClient

from core.records import ConversationRecord, EventRecord
from storage import Storage
from tests.helpers import APP_SECRET, FIXTURES, auth_headers
from webhook.parse import ParsedWebhook, read_webhook
from webhook.signature import sign

PAGE = "104325188712345"
PAGE2 = "104325188754321"
A = "7712345678901234"
B = "7798765432109876"
C = "7723456789012345"
WEBHOOKS = FIXTURES / "webhooks"
MID1 = "m_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789aBcDeFgHiJkLmNoPqRsTuVwXyZ_0aB1cD2eF3gH4iJ5kL6mN7oP8qR9sT"
MID3 = "m_AbC3TqW8eR7tY6uI5oP4aS3dF2gH1jK0lZ9xC8vB7nM6qWe5rT4yU3iO2pA1sD0f_GhJkLzXcVbNm1q2w3e4r5t6y7u8i"
BIG_PSID = "27483920175468231"  # above 2**53: a float would turn it into ...232


class Outcome(NamedTuple):
    """What a fixture becomes, with PAGE and PAGE2 registered: its inbox status and what it stores."""

    status: str
    events: tuple[str, ...] = ()  # the event types stored, sorted
    unknown: int = 0  # items of a kind not stored (or naming no contact)
    skipped: int = 0  # items that cannot be read


_RECEIVED = Outcome("applied", ("message_received",))
_SENT = Outcome("applied", ("message_sent",))
_UNKNOWN_ONLY = Outcome("applied", (), unknown=1)

# Every file of fixtures/webhooks/, and what it becomes (a test checks that none is missing).
FIXTURE_OUTCOMES: dict[str, Outcome] = {
    "attachment_audio.json": _RECEIVED,
    "attachment_fallback.json": _RECEIVED,
    "attachment_file.json": _RECEIVED,
    "attachment_location.json": _RECEIVED,
    "attachment_sticker.json": _RECEIVED,
    "attachment_template.json": _SENT,
    "attachment_video.json": _RECEIVED,
    "batch_two_entries.json": Outcome(
        "applied",
        tuple(
            sorted(
                ["message_received"] * 3 + ["message_sent", "message_delivered", "message_read", "reaction"]
            )
        ),
    ),
    "changes_test_ping.json": Outcome("ignored", (), unknown=1),
    "delivery.json": Outcome("applied", ("message_delivered",)),
    "delivery_without_timestamp.json": Outcome("applied", ("message_delivered",)),
    "duplicate_mid.json": _RECEIVED,
    "echo_without_app_id.json": _SENT,
    "handover_app_roles.json": _UNKNOWN_ONLY,
    "handover_pass_thread_control.json": _UNKNOWN_ONLY,
    "handover_request_thread_control.json": _UNKNOWN_ONLY,
    "handover_take_thread_control.json": _UNKNOWN_ONLY,
    "ids_as_numbers.json": Outcome("applied", ("message_received", "message_sent")),
    "invalid_item_type.json": Outcome("applied", ("message_received",), skipped=1),
    "invalid_out_of_range.json": Outcome("applied", ("message_read",), skipped=3),
    "invalid_outer_shape.json": Outcome("invalid"),
    "item_without_timestamp.json": _RECEIVED,
    "message_attachment.json": _RECEIVED,
    "message_echo.json": _SENT,
    "message_edit.json": Outcome("applied", ("message_edited",)),
    "message_edit_num_edit_string.json": Outcome("applied", ("message_edited",)),
    "message_quick_reply.json": _RECEIVED,
    "message_text.json": _RECEIVED,
    "message_unsend.json": Outcome("applied", ("message_deleted",)),
    "object_instagram.json": Outcome("ignored"),
    "optin.json": Outcome("applied", ("optin",)),
    "optin_checkbox_user_ref.json": _UNKNOWN_ONLY,
    "payment.json": _UNKNOWN_ONLY,
    "policy_enforcement.json": _UNKNOWN_ONLY,
    "postback.json": Outcome("applied", ("postback",)),
    "reaction_react.json": Outcome("applied", ("reaction",)),
    "reaction_unreact.json": Outcome("applied", ("reaction",)),
    "read.json": Outcome("applied", ("message_read",)),
    "read_with_mid.json": Outcome("applied", ("message_read",)),
    "referral.json": Outcome("applied", ("referral",)),
    "standby.json": Outcome("applied", ("message_received", "message_sent")),
    "standby_postback_without_payload.json": Outcome("applied", ("postback",)),
    "timestamp_seconds.json": _RECEIVED,
    "timestamp_string.json": _RECEIVED,
    "unknown_kind.json": Outcome("applied", ("message_received",), unknown=1),
}


def fixture(name: str) -> bytes:
    """The raw bytes of a webhook fixture, as Meta would send them."""
    return (WEBHOOKS / name).read_bytes()


def parse_fixture(name: str) -> ParsedWebhook:
    """A fixture as the applier reads it."""
    return read_webhook(fixture(name))


def only_event(name: str) -> tuple[str, ConversationRecord, EventRecord]:
    """The single (page, record, event) a one-event fixture yields (nothing unknown or skipped)."""
    parsed = parse_fixture(name)
    assert parsed.unknown == 0 and parsed.skipped == []
    assert len(parsed.items) == 1
    page, record = parsed.items[0]
    assert len(record.events) == 1
    return page, record, record.events[0]


def nested_body(depth: int) -> bytes:
    """A body whose `entry` nests `depth` arrays deep (msgspec refuses such depth)."""
    return b'{"object":"page","entry":' + b"[" * depth + b"]" * depth + b"}"


def item_body(*items: dict[str, Any], page: str = PAGE, time: Any = 1_732_900_000_276) -> bytes:
    """A body of one entry whose `messaging` holds `items` as given."""
    return msgspec.json.encode(
        {"object": "page", "entry": [{"id": page, "time": time, "messaging": list(items)}]}
    )


def signed(body: bytes, secret: str = APP_SECRET) -> dict[str, str]:
    """Headers of a request Meta signed."""
    return {"X-Hub-Signature-256": sign(secret.encode(), body), "Content-Type": "application/json"}


def message_body(
    mid: str, text: str, timestamp: int, sender: str = A, page: str = PAGE, echo: bool = False
) -> bytes:
    """A one-message webhook body (an echo goes from the page to `sender`)."""
    message: dict[str, Any] = {"mid": mid, "text": text}
    if echo:
        message["is_echo"] = True
    parties = (
        {"sender": {"id": page}, "recipient": {"id": sender}}
        if echo
        else {
            "sender": {"id": sender},
            "recipient": {"id": page},
        }
    )
    item = {**parties, "timestamp": timestamp, "message": message}
    return msgspec.json.encode(
        {"object": "page", "entry": [{"id": page, "time": timestamp, "messaging": [item]}]}
    )


def call(client: TestClient, fn: Any, *args: Any) -> Any:
    """Run `fn(*args)` in the app's event loop (storage and applier live there)."""
    assert client.portal is not None, "use the TestClient as a context manager"
    return client.portal.call(fn, *args)


def post(client: TestClient, body: bytes) -> Any:
    return client.post("/api/webhook", content=body, headers=signed(body))


def inbox(client: TestClient) -> dict[str, int]:
    """Inbox rows by status."""
    counts: dict[str, int] = call(client, client.app_state["services"].storage.webhook_status_counts)
    return counts


def drain(client: TestClient) -> Any:
    """Apply everything pending with the app's own applier."""
    return call(client, client.app_state["services"].applier.drain)


def conversations(client: TestClient, page_id: str, user: str = "alice") -> list[dict[str, Any]]:
    response = client.get(f"/api/conversations?pageId={page_id}&limit=500", headers=auth_headers(user))
    assert response.status_code == 200, response.text
    return list(response.json()["conversations"])


def events(client: TestClient, conversation_id: int, user: str = "alice") -> list[dict[str, Any]]:
    response = client.get(
        f"/api/conversations/{conversation_id}/events?limit=500", headers=auth_headers(user)
    )
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def all_events(client: TestClient, page_id: str, user: str = "alice") -> list[dict[str, Any]]:
    return [e for c in conversations(client, page_id, user) for e in events(client, c["id"], user)]


async def wait_until_drained(storage: Storage, bound_seconds: float = 30.0) -> dict[str, int]:
    """Poll the inbox until no row is pending (a bound for a failing test, not a timing check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_seconds
    while True:
        counts = await storage.webhook_status_counts()
        if not counts.get("pending"):
            return counts
        assert loop.time() < deadline, f"inbox still pending: {counts}"
        await asyncio.sleep(0.02)


def inbox_rows(client: TestClient) -> list[dict[str, Any]]:
    """Every inbox row (id order): status, error, attempts, applied_at."""
    columns = ("id", "status", "error", "attempts", "applied_at")

    async def read() -> list[dict[str, Any]]:
        async with client.app_state["services"].storage.engine.reader() as conn:
            rows = await conn.fetch(f"SELECT {', '.join(columns)} FROM webhook_events ORDER BY id")
        return [{c: r[c] for c in columns} for r in rows]

    rows: list[dict[str, Any]] = call(client, read)
    return rows
