"""GET /api/events/stream and the dashboard: live events over SSE, resumable, per tenant."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
import uvicorn
from starlette.testclient import TestClient

from app import create_app
from core.records import ConversationRecord, EventRecord
from core.settings import Settings
from routes.stream import event_stream
from storage import Storage, open_storage
from storage.notify import Subscription
from tests.helpers import PG_URL, auth_headers, graph_router, graph_transport, register_page
from tests.helpers.proxy import TcpProxy
from tests.helpers.storage import write_conversations

CONTACT = "7712345678901234"


def record(*mids: str, start: int = 1_732_900_000_000) -> ConversationRecord:
    events = [
        EventRecord(event_type="message_received", message_id=mid, event_timestamp=start + i, content=mid)
        for i, mid in enumerate(mids)
    ]
    return ConversationRecord(sender_id=CONTACT, events=events)


async def take(stream: AsyncIterator[bytes], count: int) -> list[dict[str, object]]:
    """The next `count` event messages of a stream (comments and retry lines skipped)."""
    out: list[dict[str, object]] = []
    while len(out) < count:
        chunk = await asyncio.wait_for(stream.__anext__(), timeout=10)
        lines = chunk.decode().splitlines()
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if data:
            event = msgspec.json.decode(data[0])
            assert f"id: {event['id']}" in lines
            out.append(event)
    return out


async def test_a_commit_wakes_the_stream_without_waiting_for_a_poll(storage: Storage) -> None:
    """With a poll an hour apart, the event still comes: the commit itself woke the stream."""
    page, _ = await storage.register_page("alice", "104325188712345", "EAAB-token", None)
    stream = event_stream(storage, page.id, 0, poll_seconds=3600)
    try:
        assert await asyncio.wait_for(stream.__anext__(), timeout=10) == b"retry: 2000\n\n"
        first = asyncio.ensure_future(take(stream, 1))
        await asyncio.sleep(0.05)  # the stream has polled once and waits
        await write_conversations(storage, page.id, [record("m_woken")])
        (event,) = await first
    finally:
        await stream.aclose()
    assert event["messageId"] == "m_woken"


async def test_stream_sends_new_events_and_resumes(storage: Storage) -> None:
    page, _ = await storage.register_page("alice", "104325188712345", "EAAB-token", None)
    await write_conversations(storage, page.id, [record("m_old")])
    start = await storage.last_event_id(page.id)
    stream = event_stream(storage, page.id, start, poll_seconds=0.01)
    try:
        first = asyncio.ensure_future(take(stream, 2))
        await asyncio.sleep(0.05)
        await write_conversations(storage, page.id, [record("m_1", "m_2", start=1_732_900_001_000)])
        got = await first
    finally:
        await stream.aclose()
    assert [e["messageId"] for e in got] == ["m_1", "m_2"]  # not the event from before it started
    # Resuming after the first one (Last-Event-ID) sends the second again, and only it onwards.
    resumed = event_stream(storage, page.id, int(str(got[0]["id"])), poll_seconds=0.01)
    try:
        again = await take(resumed, 1)
    finally:
        await resumed.aclose()
    assert again[0]["messageId"] == "m_2"


async def test_stream_sees_only_its_page(storage: Storage) -> None:
    mine, _ = await storage.register_page("alice", "104325188712345", "EAAB-token", None)
    other, _ = await storage.register_page("alice", "104325188799999", "EAAB-token", None)
    stream = event_stream(storage, mine.id, 0, poll_seconds=0.01)
    try:
        await write_conversations(storage, other.id, [record("m_other")])
        await write_conversations(storage, mine.id, [record("m_mine")])
        (event,) = await take(stream, 1)
    finally:
        await stream.aclose()
    assert event["messageId"] == "m_mine" and event["pageId"] == mine.id


async def test_late_commit_below_the_last_id_is_still_sent(storage: Storage) -> None:
    """An id lower than one already sent (a late commit on PostgreSQL) is delivered once."""
    page, _ = await storage.register_page("alice", "104325188712345", "EAAB-token", None)
    await write_conversations(storage, page.id, [record("m_1", "m_2", "m_3")])
    (conversation,) = await storage.list_conversations(page.id, 1, None)
    ids = sorted(e.id for e in await storage.list_events(conversation.id, 10, None))

    class HidesTheMiddle:
        """Storage whose first reads do not see the middle event yet."""

        def __init__(self) -> None:
            self.calls = 0

        def subscribe_events(self, page_id: str) -> Subscription:
            return storage.subscribe_events(page_id)

        async def events_after(self, page_id: str, after_id: int, limit: int, until_id: int | None = None):  # type: ignore[no-untyped-def]
            self.calls += 1
            rows = await storage.events_after(page_id, after_id, limit, until_id=until_id)
            return [r for r in rows if r.id != ids[1]] if self.calls <= 2 else rows

    stream = event_stream(HidesTheMiddle(), page.id, 0, poll_seconds=0.01)  # type: ignore[arg-type]
    try:
        got = await take(stream, 3)
    finally:
        await stream.aclose()
    assert sorted(e["messageId"] for e in got) == ["m_1", "m_2", "m_3"]


def test_stream_needs_a_key_and_the_users_page(client: TestClient) -> None:
    page = register_page(client)
    assert client.get(f"/api/events/stream?pageId={page['pageId']}").status_code == 401
    other = client.get(f"/api/events/stream?pageId={page['pageId']}", headers=auth_headers("bob"))
    assert other.status_code == 404
    assert client.get("/api/events/stream", headers=auth_headers()).status_code == 400
    bad = {**auth_headers(), "Last-Event-ID": "abc"}
    assert client.get(f"/api/events/stream?pageId={page['pageId']}", headers=bad).status_code == 400


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """The app under a real uvicorn on a free loopback port (streams need a real server), its
    Graph a stand-in serving /me (registering a page verifies the token)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(settings, graph_transport=graph_transport(graph_router()))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn offers no event for this  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_stream_over_http(settings: Settings, storage: Storage) -> None:
    async with serving(settings) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        created = await http.post(
            "/api/pages",
            json={"facebookPageId": "104325188712345", "accessToken": "EAAB-x"},
            headers=auth_headers(),
        )
        page_id = created.json()["pageId"]
        url = f"/api/events/stream?pageId={page_id}"
        async with http.stream("GET", url, headers=auth_headers()) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            assert await asyncio.wait_for(lines.__anext__(), 5) == "retry: 2000"
            # Written by another connection (another replica, say): the stream reads the tables.
            await write_conversations(storage, page_id, [record("m_live")])
            line = ""
            while not line.startswith("data: "):
                line = await asyncio.wait_for(lines.__anext__(), 5)
    event = msgspec.json.decode(line[6:])
    assert event["messageId"] == "m_live" and event["eventType"] == "message_received"


def test_dashboard_page(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<script src="/static/dashboard.js"' in response.text  # the script is a file: see the CSP


@pytest.mark.postgres_only
async def test_a_stream_outlives_a_database_outage(storage: Storage, db_url: str) -> None:
    """The database goes away under an open stream: it keeps beating, and carries on after."""
    page, _ = await storage.register_page("alice", "104325188712345", "EAAB-token", None)
    with TcpProxy.for_url(PG_URL) as proxy:
        through_proxy = await open_storage(proxy.url(db_url))
        stream = event_stream(through_proxy, page.id, 0, poll_seconds=0.01, heartbeat_seconds=0.01)
        try:
            assert await asyncio.wait_for(stream.__anext__(), 10) == b"retry: 2000\n\n"
            proxy.stop()
            # Polls fail with DatabaseUnavailable meanwhile: the stream sends heartbeats, not an error.
            beats = [await asyncio.wait_for(stream.__anext__(), 10) for _ in range(3)]
            assert beats == [b": keep-alive\n\n"] * 3
            await write_conversations(storage, page.id, [record("m_during")])  # written elsewhere
            proxy.start()
            (event,) = await take(stream, 1)
        finally:
            await stream.aclose()
            await through_proxy.close()
    assert event["messageId"] == "m_during"
