"""Webhook test helpers: signed bodies, posting, draining and reading back what was stored."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from starlette.testclient import TestClient

from storage import Storage
from tests.helpers import APP_SECRET, FIXTURES, auth_headers
from webhook.signature import sign

PAGE = "104325188712345"
PAGE2 = "104325188754321"
A = "7712345678901234"
B = "7798765432109876"
C = "7723456789012345"
WEBHOOKS = FIXTURES / "webhooks"




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
    parties = {"sender": {"id": page}, "recipient": {"id": sender}} if echo else {
        "sender": {"id": sender},
        "recipient": {"id": page},
    }
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
    counts: dict[str, int] = call(client, client.app_state["storage"].webhook_status_counts)
    return counts


def drain(client: TestClient) -> Any:
    """Apply everything pending with the app's own applier."""
    return call(client, client.app_state["applier"].drain)


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
