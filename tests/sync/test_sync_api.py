"""POST /api/conversations/sync and the sync monitoring routes, through the app, on both engines.

Graph is a respx router behind the app's httpx client (answers from fixtures/graph/).
`running_app` runs the app in the test's event loop, so requests really overlap.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

import core.services as services_module
from core.settings import Settings
from storage import Storage
from storage.base import PoolRow
from sync.graph_client import GraphClient
from tests.helpers import auth_headers, running_app
from tests.helpers.sync import (
    PAGE_FB_ID,
    WALK,
    FakeGraph,
    after_cursor,
    assert_seed_checks,
    chain,
    execute,
    graph_response,
    query,
)

C1 = after_cursor(WALK[0])
SYNC = "/api/conversations/sync"
RESPONSE_FIELDS = {
    "success",
    "synced",
    "inserted",
    "updated",
    "unchanged",
    "skipped",
    "eventsInserted",
    "hasMore",
    "resumeSession",
    "syncSessionId",
    "durationMs",
}


@pytest.fixture(autouse=True)
async def seed_checks_hold_afterwards(storage: Storage) -> AsyncIterator[None]:
    """The seed's checks hold after every test here, whatever it did."""
    yield
    await assert_seed_checks(storage)


async def register(http: httpx.AsyncClient, user: str = "alice", token: str | None = None) -> str:
    response = await http.post(
        "/api/pages",
        json={"facebookPageId": PAGE_FB_ID, "accessToken": token or f"EAAB-token-{user}", "name": "Acme"},
        headers=auth_headers(user),
    )
    assert response.status_code in (200, 201), response.text
    return str(response.json()["pageId"])


async def sync(
    http: httpx.AsyncClient, page_id: str, user: str = "alice", path: str = SYNC, **fields: Any
) -> httpx.Response:
    body = {"pageId": page_id, "facebookPageId": PAGE_FB_ID, **fields}
    return await http.post(path, json=body, headers=auth_headers(user))


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = dict(response.json())
    assert body["success"] is False and body["code"] == code and body["error"]
    return body


async def test_sync_walks_every_page_and_the_seed_path_is_an_alias(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    fake = FakeGraph(graph, chain(*WALK))
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        first = await sync(http, page_id)
        assert first.status_code == 200, first.text
        body = first.json()
        assert set(body) == RESPONSE_FIELDS
        assert (body["success"], body["synced"], body["inserted"], body["hasMore"]) == (True, 12, 12, False)
        assert body["resumeSession"] is None and isinstance(body["durationMs"], int)
        again = await sync(http, page_id, path="/api/conversations/sync-fixed")
        assert again.status_code == 200, again.text
        assert (again.json()["synced"], again.json()["inserted"]) == (0, 0)  # incremental: nothing new
    assert fake.calls == [None, *(after_cursor(name) for name in WALK[:3]), None]
    await assert_seed_checks(storage)


async def test_paging_the_read_api_visits_every_conversation_once(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    FakeGraph(graph, chain(*WALK))
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        assert (await sync(http, page_id)).status_code == 200
        seen: list[int] = []
        cursor: str | None = None
        while True:
            params = {"pageId": page_id, "limit": "5", **({"cursor": cursor} if cursor else {})}
            listing = (await http.get("/api/conversations", params=params, headers=auth_headers())).json()
            seen += [c["id"] for c in listing["conversations"]]
            cursor = listing["nextCursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) == 12
        for conversation_id in seen:
            events: list[int] = []
            cursor = None
            while True:
                params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
                url = f"/api/conversations/{conversation_id}/events"
                listing = (await http.get(url, params=params, headers=auth_headers())).json()
                events += [e["id"] for e in listing["events"]]
                cursor = listing["nextCursor"]
                if cursor is None:
                    break
            stored = await query(
                storage,
                "SELECT id FROM contact_interaction_events WHERE conversation_id = $1",
                conversation_id,
            )
            assert sorted(events) == sorted(r["id"] for r in stored) and len(events) == len(set(events)) > 0


async def test_eight_concurrent_syncs_give_one_200_and_seven_409s(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    fake = FakeGraph(graph, chain(*WALK))
    refused = 0
    release = asyncio.Event()
    fake.hooks[None] = release.wait  # the winner's first page waits until the others are answered
    async with running_app(settings, graph) as http:
        page_id = await register(http)

        async def attempt() -> httpx.Response:
            nonlocal refused
            response = await sync(http, page_id)
            if response.status_code == 409:
                refused += 1
                if refused == 7:
                    release.set()
            return response

        responses = await asyncio.wait_for(asyncio.gather(*(attempt() for _ in range(8))), 20)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 7
    for response in responses:
        if response.status_code == 409:
            body = assert_error(response, 409, "sync_in_progress")
            assert body["error"] == "Sync already in progress" and isinstance(body["expiresAt"], int)
    assert fake.calls.count(None) == 1
    assert len(await query(storage, "SELECT id FROM messenger_conversations")) == 12
    assert await storage.current_lock(page_id) is None
    await assert_seed_checks(storage)


async def test_two_replicas_give_one_200_and_one_409(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    fake = FakeGraph(graph, chain(*WALK))
    release = asyncio.Event()
    fake.hooks[None] = release.wait
    async with running_app(settings, graph) as one, running_app(settings, graph) as two:
        page_id = await register(one)

        async def attempt(http: httpx.AsyncClient) -> httpx.Response:
            response = await sync(http, page_id)
            if response.status_code == 409:
                release.set()
            return response

        responses = await asyncio.wait_for(asyncio.gather(attempt(one), attempt(two)), 20)
    assert sorted(r.status_code for r in responses) == [200, 409]
    assert_error(next(r for r in responses if r.status_code == 409), 409, "sync_in_progress")
    await assert_seed_checks(storage)


async def test_graph_auth_error_answers_502_until_the_page_is_re_registered(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    answers = chain(*WALK)
    answers[C1] = [graph_response(400, "error_190.json"), WALK[1]]
    fake = FakeGraph(graph, answers)
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        assert_error(await sync(http, page_id), 502, "graph_auth")
        pages = (await http.get("/api/pages", headers=auth_headers())).json()["pages"]
        assert pages[0]["tokenStatus"] == "invalid"
        calls = len(fake.calls)
        assert_error(await sync(http, page_id), 502, "graph_auth")
        assert len(fake.calls) == calls  # Graph was not called
        stats = (await http.get("/api/sync/stats", headers=auth_headers())).json()["statistics"]
        assert stats[0]["conversations"] == 3 and "graph_auth" in stats[0]["lastError"]
        assert await register(http, token="EAAB-fresh-token") == page_id
        resumed = await sync(http, page_id)
        assert resumed.status_code == 200, resumed.text
        assert (resumed.json()["inserted"], resumed.json()["hasMore"]) == (9, False)
    assert fake.calls[calls] == C1  # continued from the saved cursor
    assert (await storage.get_page("alice", page_id)).token_status == "valid"  # type: ignore[union-attr]
    await assert_seed_checks(storage)


async def test_rate_limit_past_the_budget_answers_502_with_the_cursor_saved(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    usage = json.dumps(
        {
            PAGE_FB_ID: [
                {
                    "type": "messenger",
                    "call_count": 20,
                    "total_cputime": 5,
                    "total_time": 5,
                    "estimated_time_to_regain_access": 10,
                }
            ]
        }
    )
    answers = chain(*WALK)
    answers[C1] = [graph_response(400, "error_4.json", {"x-business-use-case-usage": usage}), WALK[1]]
    fake = FakeGraph(graph, answers)
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        assert_error(await sync(http, page_id), 502, "graph_rate_limited")
        assert (await http.get("/api/sync/active", headers=auth_headers())).json() == {"activeSyncs": []}
        state = await storage.get_sync_state(page_id)
        assert (
            state is not None and state.last_cursor == C1 and "graph_rate_limited" in (state.last_error or "")
        )
        # The rate-limit pool holds the page (and the app, code 4) until the regain time, on
        # every replica: a sync now answers 502 at once, without calling Graph.
        held = await sync(http, page_id)
        assert_error(held, 502, "graph_rate_limited")
        assert fake.calls == [None, C1]

        def regained(now: int, rows: dict[str, PoolRow]) -> None:  # the regain time has passed
            for row in rows.values():
                row.hold_until = None

        await storage.update_rate_pool(["app", f"page:{PAGE_FB_ID}"], regained)
        later = await sync(http, page_id)
        assert later.status_code == 200 and later.json()["inserted"] == 9
    assert fake.calls[:3] == [None, C1, C1]


async def test_server_errors_past_retries_answer_502_unavailable(
    settings: Settings, graph: respx.MockRouter, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_sleep(seconds: float) -> None:
        return None

    # The app's Graph client retries with real backoff; here it retries at once.
    monkeypatch.setattr(services_module, "GraphClient", functools.partial(GraphClient, sleep=no_sleep))
    answers = chain(*WALK)
    answers[C1] = [httpx.Response(502, text="Bad Gateway")]
    fake = FakeGraph(graph, answers)
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        assert_error(await sync(http, page_id), 502, "graph_unavailable")
    assert fake.calls == [None] + [C1] * 5
    state = await storage.get_sync_state(page_id)
    assert state is not None and state.last_cursor == C1 and await storage.current_lock(page_id) is None
    await assert_seed_checks(storage)


async def test_malformed_records_are_counted_as_skipped(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    FakeGraph(graph, chain("conversations_page_malformed.json", "conversations_empty.json"))
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        body = (await sync(http, page_id)).json()
    assert (body["synced"], body["skipped"], body["hasMore"]) == (2, 2, False)
    await assert_seed_checks(storage)


async def test_bad_requests(settings: Settings, graph: respx.MockRouter, storage: Storage) -> None:
    fake = FakeGraph(graph, chain(*WALK))
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        assert_error(await http.post(SYNC, json={"pageId": page_id}), 401, "unauthorized")
        bad = await http.post(SYNC, content=b"{not json", headers=auth_headers())
        assert_error(bad, 400, "bad_request")
        missing = await http.post(SYNC, json={"pageId": page_id}, headers=auth_headers())
        assert_error(missing, 400, "validation_error")
        bad_mode = await sync(http, page_id, mode="sometimes")
        assert_error(bad_mode, 400, "validation_error")
        mismatch = await http.post(
            SYNC, json={"pageId": page_id, "facebookPageId": "999"}, headers=auth_headers()
        )
        assert_error(mismatch, 400, "bad_request")
        assert_error(await sync(http, page_id, user="bob"), 404, "not_found")  # alice's page
        assert_error(await sync(http, "no-such-page"), 404, "not_found")
        assert_error(await sync(http, page_id, resumeSession="nope"), 400, "invalid_resume_session")
        assert fake.calls == []
        done = (await sync(http, page_id)).json()
        stale = await sync(http, page_id, resumeSession=done["syncSessionId"])
        assert_error(stale, 400, "invalid_resume_session")


async def test_monitoring_routes(settings: Settings, graph: respx.MockRouter, storage: Storage) -> None:
    fake = FakeGraph(graph, chain(*WALK))
    held = fake.hold(C1)
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        await register(http, user="bob")
        running = asyncio.create_task(sync(http, page_id))
        await asyncio.wait_for(held.answering.wait(), 5)
        active = (await http.get("/api/sync/active", headers=auth_headers())).json()["activeSyncs"]
        assert [(a["pageId"], a["facebookPageId"]) for a in active] == [(page_id, PAGE_FB_ID)]
        assert isinstance(active[0]["expiresAt"], int) and active[0]["syncSessionId"]
        bobs = await http.get("/api/sync/active", headers=auth_headers("bob"))
        assert bobs.json() == {"activeSyncs": []}
        held.release.set()
        assert (await asyncio.wait_for(running, 5)).status_code == 200
        assert (await http.get("/api/sync/active", headers=auth_headers())).json() == {"activeSyncs": []}

        stats = (await http.get("/api/sync/stats", headers=auth_headers())).json()["statistics"]
        assert len(stats) == 1 and stats[0]["pageId"] == page_id
        assert (stats[0]["conversations"], stats[0]["isComplete"], stats[0]["completedSyncs"]) == (
            12,
            True,
            1,
        )
        assert stats[0]["events"] == len(await query(storage, "SELECT id FROM contact_interaction_events"))

        # A crashed holder's lease, expired: cleanup removes it once; its fencing token stays.
        lease = await storage.acquire_sync_lock(page_id, "crashed", 30)
        assert lease is not None
        await execute(storage, "UPDATE sync_locks SET expires_at = 0 WHERE page_id = $1", page_id)
        cleanup = await http.post("/api/sync/locks/cleanup", headers=auth_headers())
        assert cleanup.json() == {"removed": 1}
        again = await http.post("/api/sync/locks/cleanup", headers=auth_headers())
        assert again.json() == {"removed": 0}
        assert_error(await http.get("/api/sync/stats"), 401, "unauthorized")
    after = await storage.acquire_sync_lock(page_id, "next", 30)
    assert after is not None and after.fencing_token > lease.fencing_token


async def test_a_hanging_graph_answers_502_by_the_end_of_the_budget_and_frees_the_lock(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    fake = FakeGraph(graph, chain(*WALK))
    held = fake.hold(None)  # Graph never answers (the app's clock is real: a 100 ms budget)
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        response = await asyncio.wait_for(sync(http, page_id, maxDurationMs=100), 20)
        body = assert_error(response, 502, "graph_unavailable")
        assert "time budget" in body["error"]
        assert held.answering.is_set()
        assert (await http.get("/api/sync/active", headers=auth_headers())).json() == {"activeSyncs": []}
    assert await storage.current_lock(page_id) is None


async def test_retry_after_past_the_budget_is_the_502s_retry_after(
    settings: Settings, graph: respx.MockRouter, storage: Storage
) -> None:
    answers = chain(*WALK)
    answers[C1] = [httpx.Response(429, headers={"retry-after": "120"}), WALK[1]]
    fake = FakeGraph(graph, answers)
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        body = assert_error(await sync(http, page_id), 502, "graph_rate_limited")
        assert body["retryAfter"] == 120
    assert fake.calls == [None, C1]
    state = await storage.get_sync_state(page_id)
    assert state is not None and state.last_cursor == C1 and await storage.current_lock(page_id) is None


async def test_mode_full_after_a_failed_sync_starts_a_new_full_session(
    settings: Settings, graph: respx.MockRouter, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_sleep(seconds: float) -> None:
        return None

    monkeypatch.setattr(services_module, "GraphClient", functools.partial(GraphClient, sleep=no_sleep))
    answers = chain(*WALK)
    answers[C1] = [httpx.Response(503)]
    fake = FakeGraph(graph, answers)
    async with running_app(settings, graph) as http:
        page_id = await register(http)
        assert_error(await sync(http, page_id), 502, "graph_unavailable")
        failed = await storage.get_sync_state(page_id)
        assert failed is not None and not failed.is_complete
        answers[C1] = [WALK[1]]
        fake.requests.clear()
        full = await sync(http, page_id, mode="full")
        assert full.status_code == 200, full.text
    body = full.json()
    assert body["syncSessionId"] != failed.sync_session_id
    assert (body["synced"], body["hasMore"]) == (12, False)  # the whole walk, not "synced: 0"
    assert fake.calls[0] is None
    await assert_seed_checks(storage)
