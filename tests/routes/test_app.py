"""The HTTP surface every route shares: auth, tenants, JSON errors, pages, operations."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from starlette.testclient import TestClient

from app import create_app
from core.settings import Settings
from tests.helpers import ROOT, auth_headers, make_settings, register_page


def test_api_needs_a_valid_key(client: TestClient) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic a2V5"},
        {"Authorization": "Bearer "},
    ):
        response = client.get("/api/pages", headers=headers)
        assert response.status_code == 401
        body = response.json()
        assert body["success"] is False and body["code"] == "unauthorized" and body["error"]


def test_register_and_list_pages(client: TestClient) -> None:
    created = client.post(
        "/api/pages",
        json={"facebookPageId": "104325188712345", "accessToken": "EAAB-super-secret", "name": "Shop"},
        headers=auth_headers(),
    )
    assert created.status_code == 201
    body = created.json()
    assert body["facebookPageId"] == "104325188712345" and body["name"] == "Shop"
    again = client.post(
        "/api/pages",
        json={"facebookPageId": "104325188712345", "accessToken": "EAAB-new-secret"},
        headers=auth_headers(),
    )
    assert again.status_code == 200 and again.json()["pageId"] == body["pageId"]
    listed = client.get("/api/pages", headers=auth_headers())
    assert [p["pageId"] for p in listed.json()["pages"]] == [body["pageId"]]
    for response in (created, again, listed):
        assert "secret" not in response.text


def test_tenants_see_only_their_pages(client: TestClient) -> None:
    alice = register_page(client, "alice")
    assert client.get("/api/pages", headers=auth_headers("bob")).json() == {"pages": []}
    theirs = client.get(f"/api/conversations?pageId={alice['pageId']}", headers=auth_headers("bob"))
    assert theirs.status_code == 404 and theirs.json()["code"] == "not_found"
    mine = client.get(f"/api/conversations?pageId={alice['pageId']}", headers=auth_headers("alice"))
    assert mine.status_code == 200 and mine.json() == {"conversations": [], "nextCursor": None}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "Malformed JSON"),
        (b"", "JSON object"),
        (b"[]", "Expected `object`"),
        (b'{"facebookPageId": 123, "accessToken": "x"}', "$.facebookPageId"),
        (b'{"accessToken": "x"}', "facebookPageId"),
        (b'{"facebookPageId": "1", "accessToken": ""}', "$.accessToken"),
    ],
)
def test_bad_bodies_answer_400(client: TestClient, body: bytes, fragment: str) -> None:
    response = client.post(
        "/api/pages", content=body, headers={**auth_headers(), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["success"] is False
    assert fragment in response.json()["error"]
    assert client.get("/api/pages", headers=auth_headers()).json() == {"pages": []}


def test_huge_body_answers_413(client: TestClient) -> None:
    response = client.post("/api/pages", content=b"x" * (1024 * 1024 + 1), headers=auth_headers())
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"


def test_bad_query_parameters(client: TestClient) -> None:
    page = register_page(client)
    for query in ("limit=0", "limit=501", "limit=abc", "cursor=%%%"):
        response = client.get(f"/api/conversations?pageId={page['pageId']}&{query}", headers=auth_headers())
        assert response.status_code == 400, query
    assert client.get("/api/conversations", headers=auth_headers()).status_code == 400
    assert client.get("/api/conversations/abc/events", headers=auth_headers()).status_code == 404


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_hostile_ids_cursors_and_bodies_are_4xx(client: TestClient) -> None:
    """Each of these once answered 500 (some on PostgreSQL only)."""
    page = register_page(client)
    conversations = f"/api/conversations?pageId={page['pageId']}"
    bad = [
        # Cursors whose integers do not fit the database's 64 bits, or nest without end.
        (f"{conversations}&cursor={_cursor(b'[18446744073709551616, 1]')}", 400),
        (f"{conversations}&cursor={_cursor(b'[1, -9223372036854775809]')}", 400),
        (f"/api/conversations/1/events?cursor={_cursor(b'[' * 5_000)}", 400),
        # Digits that are not ASCII: "١٢".isdigit() and "²".isdigit() are both true.
        ("/api/conversations/%D9%A1%D9%A2/events", 404),
        ("/api/conversations/%C2%B2/events", 404),
        ("/api/conversations/99999999999999999999/events", 404),
        (f"{conversations}&limit=%D9%A1%D9%A2", 400),
        (f"/api/events/stream?pageId={page['pageId']}&lastEventId=%C2%B2", 400),
        (f"/api/events/stream?pageId={page['pageId']}&lastEventId=%D9%A1%D9%A2", 400),
        # U+0000 in an id (PostgreSQL text cannot hold it): refused, never looked up.
        ("/api/conversations?pageId=%00", 400),
        (f"/api/conversations?pageId={page['pageId']}%00", 400),
        ("/api/events/stream?pageId=a%00b", 400),
    ]
    for url, status in bad:
        response = client.get(url, headers=auth_headers())
        assert response.status_code == status, (url, response.text)
        assert response.json()["success"] is False and response.json()["code"], url
    too_big = client.get(
        f"/api/events/stream?pageId={page['pageId']}", headers={**auth_headers(), "Last-Event-ID": "9" * 30}
    )
    assert too_big.status_code == 400
    # JSON nested 100,000 deep (msgspec raises RecursionError) and ids holding U+0000.
    deep = b'{"unknown": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/api/pages", "/api/conversations/sync"):
        response = client.post(
            path, content=deep, headers={**auth_headers(), "Content-Type": "application/json"}
        )
        assert response.status_code == 400 and "nested too deeply" in response.json()["error"], path
    for body in (
        {"pageId": "a\u0000", "facebookPageId": "104325188712345"},
        {"pageId": page["pageId"], "facebookPageId": "1043\u0000"},
        {"pageId": page["pageId"], "facebookPageId": "104325188712345", "resumeSession": "\u0000"},
    ):
        response = client.post("/api/conversations/sync", json=body, headers=auth_headers())
        assert response.status_code == 400 and "U+0000" in response.json()["error"], body


def test_unknown_routes_and_methods_are_json(client: TestClient) -> None:
    missing = client.get("/api/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    wrong = client.delete("/api/pages", headers=auth_headers())
    assert wrong.status_code == 405 and wrong.json()["code"] == "method_not_allowed"


def test_unexpected_errors_are_500_without_internals(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = client.app_state["services"].storage

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("connection string postgres://secret@db")

    monkeypatch.setattr(storage, "page_sync_facts", broken)  # what GET /api/pages reads
    response = client.get("/api/pages", headers=auth_headers())
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal_error" and "secret" not in response.text
    assert body["requestId"] == response.headers["x-request-id"]


def test_operations_endpoints(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    client.get("/api/pages", headers=auth_headers())
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'http_requests_total{method="GET",route="/api/pages",status="200"}' in metrics.text


def test_readyz_reports_a_database_down(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down() -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(client.app_state["services"].storage, "ping", down)
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["code"] == "database_unavailable"


def test_create_api_key_command(db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": db_url}
    out = subprocess.run(
        [sys.executable, "app.py", "create-api-key", "carol"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = out.stdout.strip()
    assert key.startswith("msk_") and key not in out.stderr
    app = create_app(make_settings(db_url, api_keys={}))
    with TestClient(app) as client:
        assert client.get("/api/pages", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.get("/api/pages", headers={"Authorization": f"Bearer {key}x"}).status_code == 401


def test_settings_from_environment() -> None:
    settings = Settings.from_env(
        {"API_KEYS": "alice:k1, bob:k2", "FB_APP_SECRET": "shh", "SYNC_PAGE_SIZE": "50"}, env_file=None
    )
    assert settings.api_keys == {"k1": "alice", "k2": "bob"}
    assert settings.database_url == "sqlite:///./data/messenger.db"
    assert settings.sync_page_size == 50 and settings.sync_lock_ttl_seconds == 300
    assert "shh" not in repr(settings) and "k1" not in repr(settings)
    for bad in ({"API_KEYS": "nocolon"}, {"SYNC_PAGE_SIZE": "500"}, {"SQLITE_SYNCHRONOUS": "sometimes"}):
        with pytest.raises(ValueError):
            Settings.from_env(bad, env_file=None)
