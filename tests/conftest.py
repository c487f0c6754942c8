"""Fixtures shared by every test: the storage engines, the app, a Graph stand-in.

Every test that takes `db_url` (directly or through `storage`, `settings`, `client`) runs
once per engine: SQLite in a fresh file, PostgreSQL in a fresh schema of the database
named by TEST_DATABASE_URL (default: the machine's local server). TEST_ENGINES=sqlite
limits a run to one engine.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import respx
from starlette.datastructures import Secret
from starlette.testclient import TestClient

from app import create_app
from settings import Settings
from storage import Storage, open_storage

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The engine under test: every test using a database runs on each."""
    if request.param == "sqlite" and request.node.get_closest_marker("postgres_only"):
        pytest.skip("PostgreSQL only")
    return str(request.param)


@pytest.fixture
async def db_url(engine: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database on the engine under test."""
    if engine == "sqlite":
        yield f"sqlite:///{tmp_path}/test.db"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}search_path={schema}"
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def storage(db_url: str) -> AsyncIterator[Storage]:
    """A migrated storage on the engine under test."""
    store = await open_storage(db_url)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


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


@pytest.fixture
def settings(db_url: str) -> Settings:
    """Test settings on the engine under test."""
    return make_settings(db_url)


@pytest.fixture
def graph() -> Iterator[respx.MockRouter]:
    """A respx router standing in for the Graph API (only reached through the app's client)."""
    with respx.MockRouter(base_url=GRAPH_URL, assert_all_called=False) as router:
        yield router


def graph_transport(router: respx.MockRouter) -> httpx.AsyncBaseTransport:
    """An httpx transport that answers from a respx router."""
    return httpx.MockTransport(router.async_handler)


@pytest.fixture
def client(settings: Settings, graph: respx.MockRouter) -> Iterator[TestClient]:
    """A TestClient on a fresh app (lifespan run), Graph answered by `graph`."""
    app = create_app(settings, graph_transport=graph_transport(graph))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def quiet_settings(db_url: str) -> Settings:
    """Settings whose app runs no background applier: tests drain explicitly."""
    return make_settings(db_url, run_applier=False)


@pytest.fixture
def wclient(quiet_settings: Settings, graph: respx.MockRouter) -> Iterator[TestClient]:
    """A TestClient on an app without a background applier (webhook tests drain explicitly)."""
    app = create_app(quiet_settings, graph_transport=graph_transport(graph))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


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
