"""Helpers for the sync tests: a Graph stand-in on a respx router (answers from fixtures/graph/),
a fake clock, and the seed's data checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import respx

from storage import Storage
from tests.helpers import storage as storage_helpers

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures" / "graph"
PAGE_FB_ID = "104325188712345"
WALK = [f"conversations_walk_{n}.json" for n in (1, 2, 3, 4)]

Answer = str | httpx.Response | Callable[[], httpx.Response]


def load(name: str) -> dict[str, Any]:
    """A fixture's JSON."""
    return dict(json.loads((FIXTURES / name).read_bytes()))


def after_cursor(name: str) -> str:
    """The `after` cursor a listing fixture ends with."""
    return str(load(name)["paging"]["cursors"]["after"])


def graph_response(status: int, name: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """A fresh response with a fixture as its body."""
    return httpx.Response(
        status,
        content=(FIXTURES / name).read_bytes(),
        headers={"content-type": "application/json", **(headers or {})},
    )


def chain(*names: str) -> dict[str | None, list[Answer]]:
    """Answers for a walk: the first listing at the top, each next one after its predecessor's cursor."""
    answers: dict[str | None, list[Answer]] = {None: [names[0]]}
    for previous, name in zip(names, names[1:], strict=False):
        answers[after_cursor(previous)] = [name]
    return answers


class Hold:
    """A Graph answer held back: `answering` is set when Graph is asked, `release` lets it answer."""

    def __init__(self) -> None:
        self.answering = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self) -> None:
        self.answering.set()
        await self.release.wait()


class FakeGraph:
    """GET /{page}/conversations on a respx router, answered by the request's `after` cursor.

    ``answers[cursor]`` is a list used in order (its last item repeats): a fixture name (200),
    an httpx.Response, or a callable making one. ``hooks[cursor]`` is awaited before answering.
    """

    def __init__(self, router: respx.MockRouter, answers: dict[str | None, list[Answer]]) -> None:
        self.answers = answers
        self.hooks: dict[str | None, Callable[[], Awaitable[object]]] = {}
        self.requests: list[httpx.Request] = []
        self.on_call: Callable[[], None] | None = None
        self.route = router.get(f"/{PAGE_FB_ID}/conversations").mock(side_effect=self._answer)

    def hold(self, cursor: str | None) -> Hold:
        """Hold back the answer for the page after `cursor` until the test releases it."""
        hold = self.hooks[cursor] = Hold()
        return hold

    @property
    def calls(self) -> list[str | None]:
        """The `after` cursor of every request so far, in order."""
        return [r.url.params.get("after") for r in self.requests]

    async def _answer(self, request: httpx.Request) -> httpx.Response:
        after = request.url.params.get("after")
        self.requests.append(request)
        if self.on_call is not None:
            self.on_call()
        hook = self.hooks.get(after)
        if hook is not None:
            await hook()
        queue = self.answers[after]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, str):
            return graph_response(200, answer)
        if isinstance(answer, httpx.Response):
            return httpx.Response(answer.status_code, content=answer.content, headers=answer.headers)
        return answer()


class FakeTime:
    """A monotonic clock that moves only when told or slept (shared by an engine and its client).

    ``sleep`` moves the clock (a backoff that passes at once); ``alarm`` waits, without moving
    it, until the clock has moved on that far: the engine's budget timer, fired by a test
    that sets ``now`` (or by a client's ``sleep``).
    """

    def __init__(self) -> None:
        self._now = 1000.0
        self.sleeps: list[float] = []
        self._alarms: list[tuple[float, asyncio.Future[None]]] = []

    @property
    def now(self) -> float:
        return self._now

    @now.setter
    def now(self, value: float) -> None:
        self._now = value
        due = [fut for when, fut in self._alarms if when <= value]
        self._alarms = [(when, fut) for when, fut in self._alarms if when > value]
        for fut in due:
            if not fut.done():
                fut.set_result(None)

    def clock(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def alarm(self, seconds: float) -> asyncio.Future[None]:
        """A future done once the clock reads `seconds` past now (its time is fixed at the call)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if seconds <= 0:
            fut.set_result(None)
        else:
            self._alarms.append((self._now + seconds, fut))
        return fut


async def query(storage: Storage, sql: str, *args: Any) -> list[Any]:
    """Rows of a read-only query, through the storage's own engine."""
    async with storage.engine.reader() as conn:  # type: ignore[attr-defined]
        return list(await conn.fetch(sql, *args))


async def execute(storage: Storage, sql: str, *args: Any) -> int:
    """Run a write statement in its own transaction, through the storage's own engine."""
    return await storage_helpers.execute(storage, sql, *args)


async def assert_seed_checks(storage: Storage) -> None:
    """The seed's checks: no conversation without events, no duplicate events or conversations."""
    orphans = await query(
        storage,
        "SELECT c.id FROM messenger_conversations c WHERE NOT EXISTS "
        "(SELECT 1 FROM contact_interaction_events e WHERE e.conversation_id = c.id)",
    )
    assert orphans == [], "conversations without events"
    by_mid = await query(
        storage,
        "SELECT conversation_id, event_type, message_id FROM contact_interaction_events "
        "WHERE message_id IS NOT NULL GROUP BY conversation_id, event_type, message_id HAVING count(*) > 1",
    )
    assert by_mid == [], "duplicate events (by message id)"
    by_time = await query(
        storage,
        "SELECT conversation_id, event_type, event_timestamp FROM contact_interaction_events "
        "WHERE message_id IS NULL GROUP BY conversation_id, event_type, event_timestamp HAVING count(*) > 1",
    )
    assert by_time == [], "duplicate events (by timestamp)"
    messages_twice = await query(
        storage,
        "SELECT page_id, message_id FROM contact_interaction_events WHERE message_id IS NOT NULL "
        "GROUP BY page_id, message_id HAVING count(*) > 1",
    )
    assert messages_twice == [], "one message stored as several events"
    conversations_twice = await query(
        storage,
        "SELECT page_id, facebook_conversation_id FROM messenger_conversations "
        "WHERE facebook_conversation_id IS NOT NULL "
        "GROUP BY page_id, facebook_conversation_id HAVING count(*) > 1",
    )
    assert conversations_twice == [], "duplicate conversations"


async def conversation_versions(storage: Storage, page_id: str) -> dict[str, int]:
    """{sender_id: version} of a page's conversations."""
    rows = await query(
        storage, "SELECT sender_id, version FROM messenger_conversations WHERE page_id = $1", page_id
    )
    return {r["sender_id"]: r["version"] for r in rows}


def expected_walk() -> tuple[set[str], int]:
    """The contacts of the four-page walk and how many messages Graph details for them."""
    senders: set[str] = set()
    messages = 0
    for name in WALK:
        for conv in load(name)["data"]:
            senders |= {p["id"] for p in conv["participants"]["data"] if p["id"] != PAGE_FB_ID}
            messages += len(conv["messages"]["data"])
    return senders, messages
