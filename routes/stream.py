"""GET /api/events/stream?pageId=: Server-Sent Events, one message per stored event.

Each message carries the event's JSON as `data` and its id as `id`, so a client that
reconnects with `Last-Event-ID` (browsers do it on their own) resumes after the last event
it saw. The stream reads the database, not process memory, so an event written by any
replica reaches every subscriber.

On PostgreSQL, ids come from a sequence and transactions commit in any order: an event with
a lower id may become visible after a higher one was sent. So each poll also looks again at
the ids of the last few seconds and sends what it had not seen.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from core.errors import BadRequest, NotFound
from routes.auth import require_user
from storage import Storage

POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 15.0
BATCH = 500
LATE_WINDOW_SECONDS = 5.0  # how long an id range is looked at again for late commits

_encode = msgspec.json.Encoder().encode


def format_event(event: dict[str, Any]) -> bytes:
    """One SSE message: `id:` and `data:` lines, then a blank line."""
    return b"id: %d\ndata: %s\n\n" % (event["id"], _encode(event))


async def event_stream(
    storage: Storage,
    page_id: str,
    after_id: int,
    *,
    poll_seconds: float = POLL_SECONDS,
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
) -> AsyncIterator[bytes]:
    """The page's events with ids above `after_id`, as SSE messages, for as long as it is read."""
    yield b"retry: 2000\n\n"
    last = after_id  # the highest id sent
    marks: deque[tuple[float, int]] = deque()  # (when, last) snapshots: where late ids can hide
    sent: set[int] = set()  # ids sent since the oldest snapshot
    quiet_since = time.monotonic()
    while True:
        now = time.monotonic()
        marks.append((now, last))
        while len(marks) > 1 and now - marks[1][0] > LATE_WINDOW_SECONDS:
            marks.popleft()
        floor = marks[0][1]  # what had been sent a window ago: later commits hide above it
        sent = {i for i in sent if i > floor}
        late = await storage.events_after(page_id, floor, BATCH, until_id=last) if last > floor else []
        fresh = await storage.events_after(page_id, last, BATCH)
        out = [e for e in late if e["id"] not in sent] + fresh
        for event in out:
            sent.add(event["id"])
            yield format_event(event)
        if fresh:
            last = fresh[-1]["id"]
        if out:
            quiet_since = now
            if len(fresh) == BATCH:
                continue
        elif now - quiet_since >= heartbeat_seconds:
            quiet_since = now
            yield b": keep-alive\n\n"
        await asyncio.sleep(poll_seconds)


def _start_after(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest("Last-Event-ID must be an event id")
    return int(raw)


async def stream_events(request: Request) -> StreamingResponse:
    """Subscribe to a page's events; resumes after Last-Event-ID, else starts with new ones."""
    user = await require_user(request)
    page_id = request.query_params.get("pageId")
    if not page_id:
        raise BadRequest("pageId is required")
    storage: Storage = request.state.storage
    if await storage.get_page(user, page_id) is None:
        raise NotFound("Page not found")
    after = _start_after(request)
    if after is None:
        after = await storage.last_event_id(page_id)
    return StreamingResponse(
        event_stream(storage, page_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


routes = [Route("/api/events/stream", stream_events, methods=["GET"])]
