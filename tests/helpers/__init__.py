"""What tests share that is not a fixture: constants, settings, an app in this loop, API calls.

Tests import these from here (``from tests.helpers import ...``), never from another test module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import respx
from starlette.datastructures import Secret
from starlette.testclient import TestClient

from app import create_app
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "fixtures"
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
ENGINES = [e.strip() for e in os.environ.get("TEST_ENGINES", "sqlite,postgres").split(",") if e.strip()]
GRAPH_URL = "https://graph.test/v25.0"
APP_SECRET = "test-app-secret"
VERIFY_TOKEN = "test-verify-token"
KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}


def auth_headers(user: str = "alice") -> dict[str, str]:
    """Headers that authenticate as one of the test users."""
    return {"Authorization": f"Bearer {KEYS[user]}"}


def make_settings(db_url: str, **overrides: Any) -> Settings:
    """Settings for tests: two API users, a webhook secret, Graph at GRAPH_URL."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "graph_api_url": GRAPH_URL,
        "fb_app_secret": Secret(APP_SECRET),
        "fb_verify_token": Secret(VERIFY_TOKEN),
        "api_keys": {key: user for user, key in KEYS.items()},
        "sync_lock_ttl_seconds": 30.0,
        "sync_time_budget_seconds": 30.0,
    }
    values.update(overrides)
    return Settings(**values)


def graph_transport(router: respx.MockRouter) -> httpx.AsyncBaseTransport:
    """An httpx transport that answers from a respx router."""
    return httpx.MockTransport(router.async_handler)


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, router: respx.MockRouter | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An app with its lifespan running in this event loop, behind an httpx.AsyncClient.

    For tests that need real concurrency (asyncio.gather over many requests) or several
    app instances ("replicas") on one database.
    """
    app = create_app(settings, graph_transport=graph_transport(router) if router is not None else None)
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state or {})
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


def register_page(
    client: TestClient, user: str = "alice", fb_page_id: str = "104325188712345"
) -> dict[str, Any]:
    """Register a page for a user through the API; returns the response body."""
    response = client.post(
        "/api/pages",
        json={"facebookPageId": fb_page_id, "accessToken": f"EAAB-token-{user}", "name": "Test Page"},
        headers=auth_headers(user),
    )
    assert response.status_code in (200, 201), response.text
    return dict(response.json())

