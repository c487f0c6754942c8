"""GET /api/me, the admin inbox views and a page's activity (routes/admin.py), on both engines."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import respx
from starlette.testclient import TestClient

from app import create_app
from routes.auth import hash_key
from storage.base import InboxBody
from tests.helpers import KEYS, auth_headers, graph_transport, make_settings, register_page
from tests.helpers.webhook import PAGE2, call, drain, inbox, message_body, post

MINUTE = 60_000
T0 = 1_748_779_200_000


@pytest.fixture
def admin_client(db_url: str, graph: respx.MockRouter) -> Iterator[TestClient]:
    """An app where alice's key is an admin key and bob's is not; no background applier, so each
    test decides when the inbox is applied."""
    settings = make_settings(db_url, run_applier=False, admin_keys=frozenset({KEYS["alice"]}))
    app = create_app(settings, graph_transport=graph_transport(graph))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_me_says_who_the_key_is_and_whether_it_is_admin(admin_client: TestClient) -> None:
    alice = admin_client.get("/api/me", headers=auth_headers("alice"))
    assert alice.status_code == 200 and alice.json() == {"user": "alice", "admin": True}
    assert admin_client.get("/api/me", headers=auth_headers("bob")).json() == {"user": "bob", "admin": False}
    response = admin_client.get("/api/me")
    assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    bad = admin_client.get("/api/me", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401


def test_admin_views_refuse_other_keys(admin_client: TestClient) -> None:
    for method, path in (("GET", "/api/admin/inbox"), ("POST", "/api/admin/inbox/replay")):
        refused = admin_client.request(method, path, headers=auth_headers("bob"))
        assert refused.status_code == 403, refused.text
        assert refused.json() == {
            "success": False,
            "error": "This view needs an admin key (ADMIN_KEYS)",
            "code": "admin_only",
        }
        assert admin_client.request(method, path).status_code == 401
        assert admin_client.request(method, path, headers=auth_headers("alice")).status_code == 200


def test_without_admin_keys_nobody_is_admin(client: TestClient) -> None:
    assert client.get("/api/me", headers=auth_headers("alice")).json()["admin"] is False
    assert client.get("/api/admin/inbox", headers=auth_headers("alice")).status_code == 403


def test_an_admin_key_may_be_named_by_its_id(db_url: str, graph: respx.MockRouter) -> None:
    # Ids of stored keys start at 1 in a fresh database: carol's key is 1, dave's 2.
    settings = make_settings(db_url, admin_keys=frozenset({"2"}))
    app = create_app(settings, graph_transport=graph_transport(graph))
    with TestClient(app, raise_server_exceptions=False) as client:
        storage = client.app_state["services"].storage
        call(client, storage.create_api_key, "carol", hash_key("key-carol-0123456789"))
        call(client, storage.create_api_key, "dave", hash_key("key-dave-0123456789"))
        assert call(client, storage.api_key_id, hash_key("key-dave-0123456789")) == 2
        assert call(client, storage.api_key_id, hash_key(KEYS["alice"])) is None  # API_KEYS have no id

        def me(key: str) -> object:
            return client.get("/api/me", headers={"Authorization": f"Bearer {key}"}).json()

        assert me("key-dave-0123456789") == {"user": "dave", "admin": True}
        assert me("key-carol-0123456789") == {"user": "carol", "admin": False}
        assert me(KEYS["alice"]) == {"user": "alice", "admin": False}
        ok = client.get("/api/admin/inbox", headers={"Authorization": "Bearer key-dave-0123456789"})
        assert ok.status_code == 200


def test_inbox_health_counts_statuses_and_lists_recent_errors(admin_client: TestClient) -> None:
    page = register_page(admin_client)
    empty = admin_client.get("/api/admin/inbox", headers=auth_headers()).json()
    assert empty == {
        "pending": 0,
        "applied": 0,
        "ignored": 0,
        "failed": 0,
        "invalid": 0,
        "oldestPendingAt": None,
        "recentErrors": [],
    }
    post(admin_client, message_body("m_ok", "hello", T0))  # the registered page: applied
    post(admin_client, message_body("m_nobody", "hi", T0, page=PAGE2))  # no registered page: ignored
    _record(admin_client, b'{"object": "page", "entry": "not a list"}')  # not a webhook body: invalid
    post(admin_client, message_body("m_fail", "will fail", T0 + 1))  # marked failed below
    storage = admin_client.app_state["services"].storage
    pending_ids = call(admin_client, storage.pending_webhook_ids, 10)
    assert len(pending_ids) == 4

    waiting = admin_client.get("/api/admin/inbox", headers=auth_headers()).json()
    assert waiting["pending"] == 4 and waiting["applied"] == 0
    received = _column(admin_client, "SELECT received_at FROM webhook_events WHERE status = 'pending'")
    assert waiting["oldestPendingAt"] == min(received)

    call(admin_client, storage.mark_webhook_failed, [pending_ids[-1]], "database said no")
    drain(admin_client)
    health = admin_client.get("/api/admin/inbox", headers=auth_headers()).json()
    assert {k: health[k] for k in ("pending", "applied", "ignored", "failed", "invalid")} == {
        "pending": 0,
        "applied": 1,
        "ignored": 1,
        "failed": 1,
        "invalid": 1,
    }
    assert health["oldestPendingAt"] is None
    errors = health["recentErrors"]
    assert [e["status"] for e in errors] == ["failed", "invalid"]  # newest first
    assert errors[0]["id"] == pending_ids[-1] and errors[0]["error"] == "database said no"
    assert errors[1]["id"] == pending_ids[2] and errors[1]["error"]
    assert all(set(e) == {"id", "status", "error", "receivedAt"} for e in errors)  # never a body
    assert all(isinstance(e["receivedAt"], int) and e["receivedAt"] > 0 for e in errors)
    assert page["pageId"]


def _record(client: TestClient, body: bytes) -> None:
    """Put a body in the inbox as the webhook does once its signature checks out (pending)."""
    storage = client.app_state["services"].storage
    call(client, storage.record_webhook_batch, [InboxBody(body, hashlib.sha256(body).hexdigest())])


def _column(client: TestClient, sql: str, *args: object) -> list[int]:
    """The first column of a query's rows, read in the app's loop with its own storage."""

    async def read() -> list[int]:
        async with client.app_state["services"].storage.engine.reader() as conn:
            return [int(r[0]) for r in await conn.fetch(sql, *args)]

    result: list[int] = call(client, read)
    return result


def test_recent_errors_are_the_last_twenty(admin_client: TestClient) -> None:
    for n in range(23):
        _record(admin_client, b'{"object": "page", "entry": %d}' % n)
    drain(admin_client)
    health = admin_client.get("/api/admin/inbox", headers=auth_headers()).json()
    assert health["invalid"] == 23
    ids = [e["id"] for e in health["recentErrors"]]
    assert len(ids) == 20 and ids == sorted(ids, reverse=True)


def test_replay_requeues_failed_and_invalid_rows(admin_client: TestClient) -> None:
    page = register_page(admin_client)
    post(admin_client, message_body("m_replayed", "second chance", T0))
    _record(admin_client, b'{"object": "page", "entry": {}}')
    storage = admin_client.app_state["services"].storage
    first, second = call(admin_client, storage.pending_webhook_ids, 10)
    call(admin_client, storage.mark_webhook_failed, [first], "transient trouble")
    drain(admin_client)
    assert inbox(admin_client) == {"failed": 1, "invalid": 1}
    nothing_yet = admin_client.get(f"/api/conversations?pageId={page['pageId']}", headers=auth_headers())
    assert nothing_yet.json()["conversations"] == []

    replay = admin_client.post("/api/admin/inbox/replay", headers=auth_headers())
    assert replay.status_code == 200 and replay.json() == {"requeued": 2}
    assert inbox(admin_client) == {"pending": 2}
    drain(admin_client)
    # The failed row applies now; the invalid one is still not a webhook body.
    assert inbox(admin_client) == {"applied": 1, "invalid": 1}
    stored = admin_client.get(f"/api/conversations?pageId={page['pageId']}", headers=auth_headers()).json()
    assert [c["lastMessage"] for c in stored["conversations"]] == ["second chance"]
    again = admin_client.post("/api/admin/inbox/replay", headers=auth_headers())
    assert again.json() == {"requeued": 1}
    assert second


def test_activity_counts_a_pages_events_per_minute(admin_client: TestClient) -> None:
    page = register_page(admin_client)
    other = register_page(admin_client, "bob", PAGE2)
    for n in range(3):
        post(admin_client, message_body(f"m_a{n}", f"to alice {n}", T0 + n))
    post(admin_client, message_body("m_b0", "to bob", T0, page=PAGE2))
    drain(admin_client)

    response = admin_client.get(f"/api/pages/{page['pageId']}/activity?minutes=5", headers=auth_headers())
    assert response.status_code == 200, response.text
    buckets = response.json()["perMinute"]
    assert len(buckets) == 5
    minutes = [b["minute"] for b in buckets]
    assert all(m % MINUTE == 0 for m in minutes)
    assert [b - a for a, b in zip(minutes, minutes[1:], strict=False)] == [MINUTE] * 4  # oldest first
    assert sum(b["events"] for b in buckets) == 3  # stored just now, by created_at (not event time)
    stored = _column(
        admin_client, "SELECT created_at FROM contact_interaction_events WHERE page_id = $1", page["pageId"]
    )
    assert all(minutes[0] <= t < minutes[-1] + MINUTE for t in stored)

    default = admin_client.get(f"/api/pages/{page['pageId']}/activity", headers=auth_headers()).json()
    assert len(default["perMinute"]) == 60 and sum(b["events"] for b in default["perMinute"]) == 3
    bobs = admin_client.get(f"/api/pages/{other['pageId']}/activity", headers=auth_headers("bob")).json()
    assert sum(b["events"] for b in bobs["perMinute"]) == 1


def test_activity_of_another_users_page_is_not_found(admin_client: TestClient) -> None:
    page = register_page(admin_client)
    for headers, path in (
        (auth_headers("bob"), f"/api/pages/{page['pageId']}/activity"),
        (auth_headers("alice"), "/api/pages/no-such-page/activity"),
    ):
        response = admin_client.get(path, headers=headers)
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert admin_client.get(f"/api/pages/{page['pageId']}/activity").status_code == 401
    for bad in ("0", "1441", "ten"):
        path = f"/api/pages/{page['pageId']}/activity?minutes={bad}"
        response = admin_client.get(path, headers=auth_headers())
        assert response.status_code == 400 and response.json()["code"] == "bad_request"
