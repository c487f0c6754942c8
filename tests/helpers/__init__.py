"""What tests share that is not a fixture: constants, settings, an app in this loop, API calls.

Tests import these from here (``from tests.helpers import ...``), never from another test module.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import respx
from starlette.datastructures import Secret
from starlette.testclient import TestClient

from app import create_app
from core.services import Services
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "fixtures"
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
ENGINES = [e.strip() for e in os.environ.get("TEST_ENGINES", "sqlite,postgres").split(",") if e.strip()]
GRAPH_URL = "https://graph.test/v25.0"
APP_SECRET = "test-app-secret"
VERIFY_TOKEN = "test-verify-token"
KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}
DEFAULT_PAGE = "104325188712345"  # the test Page: a token that names no Page belongs to it


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def auth_headers(user: str = "alice") -> dict[str, str]:
    """Headers that authenticate as one of the test users."""
    return {"Authorization": f"Bearer {KEYS[user]}"}


def make_settings(db_url: str, **overrides: Any) -> Settings:
    """Settings for tests: two API users, a webhook secret, Graph at GRAPH_URL.

    No background syncs (SYNC_INTERVAL_SECONDS=0) and a per-page Graph ceiling so high that the
    rate-limit pool never spaces a test's calls: a test about the scheduler or the pool says so
    (tests/helpers/autopilot.py autopilot_settings).
    """
    values: dict[str, Any] = {
        "sync_interval_seconds": 0.0,
        "graph_page_calls_per_second": 10_000.0,
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


def services(client: TestClient) -> Services:
    """What a TestClient's app lifespan provides (its `Services`)."""
    found: Services = client.app_state["services"]
    return found


def graph_transport(router: respx.MockRouter) -> httpx.AsyncBaseTransport:
    """An httpx transport that answers from a respx router."""
    return httpx.MockTransport(router.async_handler)


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings,
    router: respx.MockRouter | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """An app with its lifespan running in this event loop, behind an httpx.AsyncClient.

    For tests that need real concurrency (asyncio.gather over many requests) or several
    app instances ("replicas") on one database. Graph is answered by `router` (respx) or by
    `transport` (e.g. an httpx.ASGITransport to the Graph stand-in).
    """
    if transport is None and router is not None:
        transport = graph_transport(router)
    app = create_app(settings, graph_transport=transport)
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state or {})
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


def page_token(fb_page_id: str = DEFAULT_PAGE, user: str = "alice") -> str:
    """A Page access token of `fb_page_id` (one per user): the `graph` fixture's /me answers that Page."""
    return f"EAAB-{fb_page_id}-{user}"


MeOverride = httpx.Response | Callable[[httpx.Request], Awaitable[httpx.Response]]


class GraphMe:
    """The Graph stand-in's ``GET /me?fields=id,name``: whose token is this?

    Like Graph, it answers the id (and name) of whoever the token was issued for, read from the
    Authorization header:

    * a token in ``tokens`` answers its entry (``add_page``, ``add_user``);
    * ``EAAB-<pageId>-...`` (what ``page_token`` makes) is a token of Page <pageId>;
    * any other ``EAAB...`` token is one of the test Page, ``DEFAULT_PAGE``;
    * anything else, or no token, is refused as Graph does: 400, code 190.

    ``answer`` replaces all of that with one response (or an async function of the request), for
    the tests of Graph's failures. Every request is kept in ``requests``.
    """

    _PAGE_TOKEN = re.compile(r"EAAB-(\d+)-")

    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.answer: MeOverride | None = None

    def add_page(self, token: str, fb_page_id: str, name: str | None = None) -> None:
        """Make `token` a Page access token of `fb_page_id`."""
        self.tokens[token] = {"id": fb_page_id, "name": name or f"Page {fb_page_id}"}

    def add_user(self, token: str, user_id: str = "10228765432109876", name: str = "Some User") -> None:
        """Make `token` a user access token: /me answers the user, not a Page."""
        self.tokens[token] = {"id": user_id, "name": name}

    def owner(self, token: str) -> dict[str, Any] | None:
        """What /me answers for `token`, or None for a token Graph does not know."""
        if token in self.tokens:
            return self.tokens[token]
        match = self._PAGE_TOKEN.match(token)
        if match is not None:
            return {"id": match.group(1), "name": f"Page {match.group(1)}"}
        if token.startswith("EAAB"):
            return {"id": DEFAULT_PAGE, "name": "Test Page"}
        return None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.answer is not None:
            if isinstance(self.answer, httpx.Response):
                return httpx.Response(
                    self.answer.status_code, content=self.answer.content, headers=self.answer.headers
                )
            return await self.answer(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        owner = self.owner(token) if scheme == "Bearer" else None
        if owner is None:
            error = {
                "message": "Invalid OAuth access token - Cannot parse access token",
                "type": "OAuthException",
                "code": 190,
                "fbtrace_id": "AStandInTrace",
            }
            return httpx.Response(400, json={"error": error})
        fields = request.url.params.get("fields", "id,name").split(",")  # Graph's default for /me
        return httpx.Response(200, json={k: v for k, v in owner.items() if k in fields})

    def install(self, router: respx.MockRouter) -> respx.Route:
        """Serve GET /me on a respx router whose base_url is the Graph API's."""
        return router.get("/me").mock(side_effect=self)


def graph_router(me: GraphMe | None = None) -> respx.MockRouter:
    """A respx router standing in for Graph (serving /me from `me`), reached only through the
    transport `graph_transport` makes: it does not patch httpx, so a test's own client can still
    reach a real server (the `graph` fixture's router patches every httpx client while it runs)."""
    router = respx.MockRouter(base_url=GRAPH_URL, assert_all_called=False)
    (me or GraphMe()).install(router)
    return router


def register_page(client: TestClient, user: str = "alice", fb_page_id: str = DEFAULT_PAGE) -> dict[str, Any]:
    """Register a page for a user through the API (its token verified by the `graph` fixture's /me)."""
    response = client.post(
        "/api/pages",
        json={"facebookPageId": fb_page_id, "accessToken": page_token(fb_page_id, user), "name": "Test Page"},
        headers=auth_headers(user),
    )
    assert response.status_code in (200, 201), response.text
    return dict(response.json())
