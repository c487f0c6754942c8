"""Fixtures shared by every test: the storage engines, the app, a Graph stand-in.

Every test that takes `db_url` (directly or through `storage`, `settings`, `client`) runs
once per engine: SQLite in a fresh file, PostgreSQL in a fresh schema of the database
named by TEST_DATABASE_URL (default: the machine's local server). TEST_ENGINES=sqlite
limits a run to one engine.

Behind a transaction pooler (tests/pgbouncer.sh) a schema cannot be chosen per connection
(PgBouncer refuses `search_path` as a startup parameter), so TEST_PG_ISOLATION=database gives
each test a fresh database instead, created and dropped over TEST_ADMIN_DATABASE_URL (a direct
connection to the server behind the pooler); TEST_DATABASE_URL names the pooler.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import respx
from starlette.testclient import TestClient

from app import create_app
from core.settings import Settings
from storage import Storage, open_storage
from tests.helpers import ENGINES, GRAPH_URL, PG_URL, GraphMe, graph_transport, make_settings


@pytest.fixture(params=[pytest.param(e, marks=getattr(pytest.mark, e)) for e in ENGINES])
def engine(request: pytest.FixtureRequest) -> str:
    """The engine under test: every test using a database runs on each (`-m sqlite`, `-m postgres`)."""
    if request.param == "sqlite" and request.node.get_closest_marker("postgres_only"):
        pytest.skip("PostgreSQL only")
    return str(request.param)


# "schema" (a fresh schema per test) or "database" (a fresh database per test: behind a pooler).
PG_ISOLATION = os.environ.get("TEST_PG_ISOLATION", "schema")
# A direct connection to the server (not through a pooler): creates and drops the test databases.
PG_ADMIN_URL = os.environ.get("TEST_ADMIN_DATABASE_URL", PG_URL)


def _with_database(url: str, database: str) -> str:
    """`url` naming another database (its query string dropped)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", "", ""))


@pytest.fixture
async def pg_database(engine: str) -> AsyncIterator[str | None]:
    """A fresh PostgreSQL database when tests are isolated by database (else None), dropped after."""
    if engine != "postgres" or PG_ISOLATION != "database":
        yield None
        return
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
    finally:
        await admin.close()
    yield name
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        # FORCE: the pooler may still hold server connections to it.
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def db_url(engine: str, tmp_path: Path, pg_database: str | None) -> AsyncIterator[str]:
    """A fresh, empty database on the engine under test."""
    if engine == "sqlite":
        yield f"sqlite:///{tmp_path}/test.db"
        return
    if pg_database is not None:
        yield _with_database(PG_URL, pg_database)
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
def direct_db_url(db_url: str, pg_database: str | None) -> str:
    """`db_url` without any pooler in between (DATABASE_DIRECT_URL: what LISTEN needs)."""
    return db_url if pg_database is None else _with_database(PG_ADMIN_URL, pg_database)


@pytest.fixture
async def storage(db_url: str) -> AsyncIterator[Storage]:
    """A migrated storage on the engine under test."""
    store = await open_storage(db_url)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def settings(db_url: str) -> Settings:
    """Test settings on the engine under test."""
    return make_settings(db_url)


@pytest.fixture
def graph_me() -> GraphMe:
    """The Graph stand-in's /me: the Page (or user) each access token belongs to."""
    return GraphMe()


@pytest.fixture
def graph(graph_me: GraphMe) -> Iterator[respx.MockRouter]:
    """A respx router standing in for the Graph API (only reached through the app's client).

    It serves /me from `graph_me`, so every page registered through the API in the tests has its
    token verified, as in production; tests add the other routes they need.
    """
    with respx.MockRouter(base_url=GRAPH_URL, assert_all_called=False) as router:
        graph_me.install(router)
        yield router


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
