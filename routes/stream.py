"""GET /api/events/stream?pageId=: Server-Sent Events, one message per stored event.

Each message carries the event's JSON as `data` and its id as `id`, so a client that
reconnects with `Last-Event-ID` (browsers do it on their own) resumes after the last event
it saw. The stream reads the database, not process memory, so an event written by any
replica reaches every subscriber. A commit of the page's events wakes the stream at once
(`storage.subscribe_events`: in this process, and from other replicas on PostgreSQL with a
LISTEN connection); polling every POLL_SECONDS stays as the fallback.

On PostgreSQL, ids come from a sequence and transactions commit in any order: an event with
a lower id may become visible after a higher one was sent. So each poll also looks again at
the ids of the last few seconds and sends what it had not seen.

An API key holds at most MAX_STREAMS_PER_KEY open streams in a process (429 too_many_streams
beyond): each stream is a connection and a poll loop, and a few thousand idle ones slow every
other request down. A stream outlives a database outage: it keeps its heartbeat and carries on
from the last id it sent when the database answers again. It ends when the client leaves, or at
shutdown when the server's graceful timeout (`--timeout-graceful-shutdown`) runs out; the client
reconnects with Last-Event-ID (SSE clients do it on their own) and misses nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from core.errors import BadRequest, DatabaseUnavailable, NotFound, TooManyStreams
from routes.auth import hash_key, require_user
from routes.common import ascii_int, query_id, services
from routes.conversations import event_body
from storage import Storage
from storage.rows import EventRow

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 15.0
BATCH = 500
LATE_WINDOW_SECONDS = 5.0  # how long an id range is looked at again for late commits
MAX_STREAMS_PER_KEY = 20  # the SPEC's limit, per API key and process

_encode = msgspec.json.Encoder().encode


def format_event(event: EventRow) -> bytes:
    """One SSE message: `id:` and `data:` lines (the event's JSON, as the API shows it), then a blank line."""
    return b"id: %d\ndata: %s\n\n" % (event.id, _encode(event_body(event)))


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
    with storage.subscribe_events(page_id) as woken:
        while True:
            now = time.monotonic()
            marks.append((now, last))
            while len(marks) > 1 and now - marks[1][0] > LATE_WINDOW_SECONDS:
                marks.popleft()
            floor = marks[0][1]  # what had been sent a window ago: later commits hide above it
            sent = {i for i in sent if i > floor}
            try:
                late = (
                    await storage.events_after(page_id, floor, BATCH, until_id=last) if last > floor else []
                )
                fresh = await storage.events_after(page_id, last, BATCH)
            except DatabaseUnavailable:
                # Keep the connection (and the heartbeat) through the outage, and go on from `last`.
                late = fresh = []
            out = [e for e in late if e.id not in sent] + fresh
            for event in out:
                sent.add(event.id)
                yield format_event(event)
            if fresh:
                last = fresh[-1].id
            if out:
                quiet_since = now
                if len(fresh) == BATCH:
                    continue
            elif now - quiet_since >= heartbeat_seconds:
                quiet_since = now
                yield b": keep-alive\n\n"
            # A commit of the page's events (in this process, or any replica with a listener)
            # wakes the stream at once; the poll is the fallback.
            await woken.wait(poll_seconds)


def _start_after(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    if raw is None or raw == "":
        return None
    value = ascii_int(raw)
    if value is None or value < 0:
        raise BadRequest("Last-Event-ID must be an event id")
    return value


class StreamSlots:
    """Open event streams per API key (by the key's hash), at most `limit` each, in this process."""

    def __init__(self, limit: int = MAX_STREAMS_PER_KEY) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def take(self, key_hash: str) -> Callable[[], None]:
        """Take a slot for the key, or raise TooManyStreams (429); returns its release (call once)."""
        count = self._open.get(key_hash, 0)
        if count >= self.limit:
            raise TooManyStreams(
                f"At most {self.limit} event streams may be open per API key", limit=self.limit
            )
        self._open[key_hash] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._open.get(key_hash, 0) - 1
                if left > 0:
                    self._open[key_hash] = left
                else:
                    self._open.pop(key_hash, None)

        return release

    def count(self, key_hash: str) -> int:
        """Streams open for the key now."""
        return self._open.get(key_hash, 0)


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that gives its slot back however it ends (done, disconnect, cancelled)."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def stream_events(request: Request) -> StreamingResponse:
    """Subscribe to a page's events; resumes after Last-Event-ID, else starts with new ones."""
    user = await require_user(request)
    page_id = query_id(request, "pageId")
    found = services(request)
    storage = found.storage
    if await storage.get_page(user, page_id) is None:
        raise NotFound("Page not found")
    after = _start_after(request)
    if after is None:
        after = await storage.last_event_id(page_id)
    # require_user accepted the header, so it holds a bearer key: count the streams by its hash.
    key = request.headers["authorization"].partition(" ")[2].strip()
    release = found.streams.take(hash_key(key))
    return EventStreamResponse(event_stream(storage, page_id, after), release)


routes = [Route("/api/events/stream", stream_events, methods=["GET"])]
