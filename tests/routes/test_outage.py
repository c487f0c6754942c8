"""A database that goes away and comes back, as clients see it (SPEC: "While the database is
unreachable"): every route that needs it answers 503 `database_unavailable` in the SPEC's shape,
the others keep answering, and the service recovers on its own.

PostgreSQL goes away for real: the app reaches it through a TCP proxy (tests/helpers/proxy.py)
that the test stops (connections reset, new ones refused) and starts again. SQLite cannot go away
like a server (its connections stay open); what makes it unusable in practice is the disk, so the
test fills it: a real uvicorn process whose file-size limit drops to zero (`prlimit`) cannot write
its database, as on a full or failing volume, while it can still read it.
"""

from __future__ import annotations

import asyncio
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from starlette.routing import BaseRoute, Mount, Route
from starlette.testclient import TestClient

from app import create_app
from storage import open_storage
from tests.helpers import (
    APP_SECRET,
    KEYS,
    PG_URL,
    auth_headers,
    graph_router,
    graph_transport,
    make_settings,
    page_token,
)
from tests.helpers.proxy import TcpProxy
from webhook.signature import sign

PAGE = "104325188712345"
# Routes that answer without the database (as do mounted static files); every other one needs it.
NO_DATABASE = {
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/api/webhook"),
    ("GET", "/api/me"),  # for a key from API_KEYS / ADMIN_KEYS, as here
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
}
STREAM = ("GET", "/api/events/stream")


def endpoints(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path template) of every route of the app, mounted ones included."""
    for route in routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or ["GET"]):
                if method != "HEAD":
                    yield method, prefix + route.path
        elif isinstance(route, Mount) and route.routes:
            yield from endpoints(list(route.routes), prefix + route.path)
        # A Mount without routes is an app of files (static assets): no database behind it.


def webhook_body(mid: str) -> bytes:
    """A signed-able webhook body with one message from a fixed contact."""
    item = {
        "sender": {"id": "7712345678901234"},
        "recipient": {"id": PAGE},
        "timestamp": 1_732_900_000_000,
        "message": {"mid": mid, "text": "hello"},
    }
    return msgspec.json.encode({"object": "page", "entry": [{"id": PAGE, "time": 1, "messaging": [item]}]})


def call(client: TestClient, method: str, template: str, page_id: str) -> httpx.Response:
    """A request to the route that would reach its database work: a valid admin key, plausible ids,
    and one body that every route taking one accepts (and that is signed, for the webhook)."""
    path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: page_id if "page" in m.group(1) else "1", template)
    body = msgspec.json.encode(
        {
            "facebookPageId": PAGE,
            "accessToken": page_token(PAGE),
            "pageId": page_id,
            "object": "page",
            "entry": [],
        }
    )
    headers = {
        **auth_headers(),
        "Content-Type": "application/json",
        "X-Hub-Signature-256": sign(APP_SECRET.encode(), body),
    }
    params = {"pageId": page_id}
    if method == "GET":
        return client.get(path, params=params, headers=headers)
    return client.request(method, path, params=params, headers=headers, content=body)


def is_database_unavailable(response: httpx.Response) -> bool:
    """503 database_unavailable, in the SPEC's JSON shape."""
    if response.status_code != 503:
        return False
    body = response.json()
    return body == {"success": False, "error": body["error"], "code": "database_unavailable"} and bool(
        body["error"]
    )


@pytest.mark.postgres_only
def test_every_route_while_postgres_is_away_and_back(db_url: str) -> None:
    with TcpProxy.for_url(PG_URL) as proxy:
        settings = make_settings(proxy.url(db_url), admin_keys=frozenset({KEYS["alice"]}))
        graph = graph_router()
        graph.get(path__regex=r"/\d+/conversations").respond(200, json={"data": []})
        app = create_app(settings, graph_transport=graph_transport(graph))
        with TestClient(app, raise_server_exceptions=False) as client:
            created = client.post(
                "/api/pages",
                json={"facebookPageId": PAGE, "accessToken": page_token(PAGE)},
                headers=auth_headers(),
            )
            assert created.status_code == 201, created.text
            page_id = created.json()["pageId"]
            routes = sorted(set(endpoints(app.routes)))
            needs_database = [r for r in routes if r not in NO_DATABASE]
            assert ("POST", "/api/webhook") in needs_database and len(needs_database) >= 10

            proxy.stop()  # PostgreSQL is gone: the pool's connections are reset, new ones refused
            answers = {route: call(client, *route, page_id) for route in routes}
            wrong = {
                route: (r.status_code, r.text[:200])
                for route, r in answers.items()
                if route in needs_database and not is_database_unavailable(r)
            }
            assert not wrong, wrong
            assert all(answers[route].status_code < 500 for route in NO_DATABASE if route in answers)
            assert client.get("/healthz").status_code == 200
            assert is_database_unavailable(client.get("/readyz"))

            proxy.start()  # back: no restart, no request failing first
            # (An event stream that opens never ends, and a TestClient reads responses whole: the
            # stream's own recovery is test_stream.py's.)
            # (Deletes last: they would take the page the rest of the test reads.)
            deletes = [route for route in routes if route[0] == "DELETE"]
            answers = {
                route: call(client, *route, page_id)
                for route in routes
                if route != STREAM and route not in deletes
            }
            wrong = {
                route: (r.status_code, r.text[:200]) for route, r in answers.items() if r.status_code >= 500
            }
            assert not wrong, wrong
            assert client.get("/readyz").status_code == 200
            # Background work carried on through the outage too: a webhook acknowledged now is applied.
            body = webhook_body("m_after_the_outage")
            signed = {"X-Hub-Signature-256": sign(APP_SECRET.encode(), body)}
            assert client.post("/api/webhook", content=body, headers=signed).status_code == 200
            deadline = time.monotonic() + 30
            while True:
                listed = client.get(f"/api/conversations?pageId={page_id}", headers=auth_headers()).json()
                if listed["conversations"]:
                    break
                assert time.monotonic() < deadline, "the applier did not come back"
                time.sleep(0.05)
            assert listed["conversations"][0]["lastMessage"] == "hello"
            assert deletes and all(call(client, *route, page_id).status_code < 500 for route in deletes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prlimit on another process is Linux's")
def test_sqlite_on_a_full_disk_and_after(tmp_path: Path, service_process: Callable[..., Any]) -> None:
    url = f"sqlite:///{tmp_path}/full.db"

    async def prepare() -> str:
        storage = await open_storage(url)
        try:
            await storage.migrate()
            page, _ = await storage.register_page("alice", PAGE, page_token(PAGE), None)
            return page.id
        finally:
            await storage.close()

    page_id = asyncio.run(prepare())
    service = service_process(url)
    http = httpx.Client(base_url=service.base_url, timeout=30)

    def post_webhook(mid: str) -> httpx.Response:
        body = webhook_body(mid)
        return http.post(
            "/api/webhook", content=body, headers={"X-Hub-Signature-256": sign(APP_SECRET.encode(), body)}
        )

    sync = {"pageId": page_id, "facebookPageId": PAGE}
    try:
        assert post_webhook("m_before").status_code == 200
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.prlimit(service.pid, resource.RLIMIT_FSIZE, (0, hard))  # the disk is full
        try:
            # Writes cannot happen: 503 database_unavailable, never a 500.
            assert is_database_unavailable(post_webhook("m_during"))
            # (a sync takes its lock first: a write)
            assert is_database_unavailable(
                http.post("/api/conversations/sync", json=sync, headers=auth_headers())
            )
            # Reads of the file still work: nothing a user can read is refused.
            pages = http.get("/api/pages", headers=auth_headers())
            assert pages.status_code == 200 and [p["pageId"] for p in pages.json()["pages"]] == [page_id]
            assert http.get("/healthz").status_code == 200
        finally:
            resource.prlimit(service.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space again
        # Recovered on its own: the same process writes again.
        assert post_webhook("m_after").status_code == 200
        deadline = time.monotonic() + 30
        while True:
            listed = http.get(f"/api/conversations?pageId={page_id}", headers=auth_headers()).json()
            if listed["conversations"] and listed["conversations"][0]["messageCount"] == 2:
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.05)
    finally:
        http.close()
