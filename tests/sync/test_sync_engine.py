"""SyncEngine on both engines, Graph mocked at the httpx layer from fixtures/graph/.

The engine and its GraphClient share a fake clock (FakeTime), so backoffs do not sleep and
time budgets run out exactly when a test says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest
import respx

from core.errors import (
    GraphAuthError,
    GraphRateLimited,
    GraphUnavailable,
    InvalidResumeSession,
    LeaseLost,
    NotFound,
    ServiceUnavailable,
)
from core.metrics import Metrics
from core.settings import Settings
from schema.api import SyncRequest
from schema.graph import parse_graph_time
from storage import Storage
from storage.base import Page
from sync.engine import SyncEngine
from sync.graph_client import GraphClient
from tests.helpers import GRAPH_URL
from tests.helpers.sync import (
    PAGE_FB_ID,
    WALK,
    FakeGraph,
    FakeTime,
    after_cursor,
    assert_seed_checks,
    chain,
    conversation_versions,
    execute,
    expected_walk,
    graph_response,
    query,
)

C1, C2, C3 = (after_cursor(name) for name in WALK[:3])


@pytest.fixture(autouse=True)
async def seed_checks_hold_afterwards(storage: Storage) -> AsyncIterator[None]:
    """The seed's checks hold after every test here, whatever it did."""
    yield
    await assert_seed_checks(storage)


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    # Reached only through the engine's own transport; nothing is patched globally.
    yield respx.MockRouter(base_url=GRAPH_URL, assert_all_called=False)


@pytest.fixture
async def page(storage: Storage) -> Page:
    registered, _ = await storage.register_page("alice", PAGE_FB_ID, "EAAB-token-alice", "Acme")
    return registered


@asynccontextmanager
async def sync_engine(
    storage: Storage, router: respx.MockRouter, settings: Settings
) -> AsyncIterator[tuple[SyncEngine, FakeTime]]:
    fake = FakeTime()
    transport = httpx.MockTransport(router.async_handler)
    async with httpx.AsyncClient(base_url=GRAPH_URL, transport=transport) as http:
        graph = GraphClient(http, sleep=fake.sleep, clock=fake.clock, random=lambda: 1.0)
        yield SyncEngine(storage, graph, settings, Metrics(), clock=fake.clock, alarm=fake.alarm), fake


def request(page: Page, **fields: Any) -> SyncRequest:
    return SyncRequest(page_id=page.id, facebook_page_id=page.facebook_page_id, **fields)


async def wait_for(predicate: Any, what: str) -> None:
    """Poll an async predicate (the engine runs concurrently) for at most a few seconds."""
    for _ in range(500):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_full_sync_walks_every_page(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    async with sync_engine(storage, router, settings) as (engine, _):
        result = await engine.sync("alice", request(page))
    senders, messages = expected_walk()
    assert result.has_more is False and result.resume_session is None
    assert (result.synced, result.inserted, result.updated, result.unchanged) == (12, 12, 0, 0)
    assert result.skipped == 0 and result.events_inserted == messages
    assert graph.calls == [None, C1, C2, C3]
    assert set(await conversation_versions(storage, page.id)) == senders
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.is_complete and state.last_cursor is None
    assert state.sync_session_id == result.session_id and state.total_synced == 12
    newest = json.loads(graph_response(200, WALK[0]).content)["data"][0]["updated_time"]
    assert state.watermark == parse_graph_time(newest)
    assert await storage.current_lock(page.id) is None
    # The attachment-only message is labelled as a webhook would label it; counts come from Graph.
    rows = await query(
        storage, "SELECT content, payload FROM contact_interaction_events WHERE content LIKE '[%'"
    )
    assert len(rows) == 1 and "attachments" in json.loads(rows[0]["payload"])
    assert rows[0]["content"] in ("[image]", "[video]", "[audio]", "[file]")
    await assert_seed_checks(storage)


async def test_full_resync_inserts_nothing_and_bumps_no_version(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    FakeGraph(router, chain(*WALK))
    async with sync_engine(storage, router, settings) as (engine, _):
        first = await engine.sync("alice", request(page))
        again = await engine.sync("alice", request(page, mode="full"))
    assert again.session_id != first.session_id
    assert (again.synced, again.inserted, again.updated, again.unchanged) == (12, 0, 0, 12)
    assert again.events_inserted == 0
    assert set((await conversation_versions(storage, page.id)).values()) == {0}
    await assert_seed_checks(storage)


async def test_default_resync_is_incremental_and_reads_one_page(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    async with sync_engine(storage, router, settings) as (engine, _):
        await engine.sync("alice", request(page))
        graph.requests.clear()
        again = await engine.sync("alice", request(page))
    assert graph.calls == [None]
    assert (again.synced, again.inserted, again.has_more) == (0, 0, False)
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.mode == "incremental" and state.completed_syncs == 2


async def test_incremental_sync_updates_only_new_conversations(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain("conversations_page1.json", "conversations_page2.json"))
    async with sync_engine(storage, router, settings) as (engine, _):
        await engine.sync("alice", request(page))
        before = await conversation_versions(storage, page.id)
        graph.answers[None] = ["conversations_incremental.json"]
        graph.requests.clear()
        result = await engine.sync("alice", request(page))
    # New first: one new contact, Zoë's new message; the third is older than the watermark.
    assert graph.calls == [None]
    assert (result.synced, result.inserted, result.updated, result.unchanged) == (2, 1, 1, 0)
    assert result.events_inserted == 2 and result.has_more is False
    after = await conversation_versions(storage, page.id)
    assert after.pop("5123987460192834") == 0
    assert after.pop("7234519876543210") == 1
    assert after == {sender: 0 for sender in before if sender != "7234519876543210"}
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.watermark == parse_graph_time("2025-06-02T08:05:31+0000")
    await assert_seed_checks(storage)


async def test_time_budget_returns_has_more_and_resuming_completes(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    async with sync_engine(storage, router, settings) as (engine, fake):

        def slow_graph() -> None:  # every Graph call takes 6 of the request's 10 seconds
            fake.now += 6.0

        graph.on_call = slow_graph
        results = [await engine.sync("alice", request(page, max_duration_ms=10_000))]
        await assert_seed_checks(storage)
        # Without resumeSession the unfinished session is continued; with it, too.
        results.append(await engine.sync("alice", request(page, max_duration_ms=10_000)))
        while results[-1].has_more:
            await assert_seed_checks(storage)
            resume = results[-1].resume_session
            results.append(
                await engine.sync("alice", request(page, max_duration_ms=10_000, resume_session=resume))
            )
    first = results[0]
    assert first.has_more is True and first.resume_session == first.session_id
    # 6 s per page against a 10 s budget: one page per request, four requests.
    assert [r.synced for r in results] == [3, 3, 3, 3]
    assert {r.session_id for r in results} == {first.session_id}
    assert sum(r.inserted for r in results) == 12
    assert results[-1].resume_session is None
    # Resuming fetches at most one page again.
    assert graph.calls.count(None) == 1 and all(graph.calls.count(c) <= 2 for c in (C1, C2, C3))
    assert len(await conversation_versions(storage, page.id)) == 12
    await assert_seed_checks(storage)
    with pytest.raises(InvalidResumeSession):  # a complete session cannot be resumed
        async with sync_engine(storage, router, settings) as (engine, _):
            await engine.sync("alice", request(page, resume_session=first.session_id))
    assert await storage.current_lock(page.id) is None


async def test_next_page_is_fetched_while_the_current_one_is_written(
    storage: Storage,
    page: Page,
    router: respx.MockRouter,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    write = storage.save_conversation_page

    async def write_once_the_next_page_is_asked_for(lease: Any, records: Any, progress: Any) -> Any:
        async def next_page_asked_for() -> bool:
            return progress.last_cursor in graph.calls

        if progress.last_cursor is not None:  # without a prefetch this would wait in vain
            await wait_for(next_page_asked_for, "the next page's request")
        return await write(lease, records, progress)

    monkeypatch.setattr(storage, "save_conversation_page", write_once_the_next_page_is_asked_for)
    async with sync_engine(storage, router, settings) as (engine, _):
        result = await engine.sync("alice", request(page))
    assert result.synced == 12 and graph.calls == [None, C1, C2, C3]


async def test_unknown_resume_session_is_refused_and_the_lock_released(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    async with sync_engine(storage, router, settings) as (engine, _):
        with pytest.raises(InvalidResumeSession):
            await engine.sync("alice", request(page, resume_session="no-such-session"))
        assert graph.calls == []
        assert await storage.current_lock(page.id) is None
        assert (await engine.sync("alice", request(page))).synced == 12


async def test_cancelled_sync_resumes_from_the_last_committed_cursor(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    held = graph.hold(C1)  # never released: Graph is answering page 2 when the task is killed
    async with sync_engine(storage, router, settings) as (engine, _):
        task = asyncio.create_task(engine.sync("alice", request(page)))
        await asyncio.wait_for(held.answering.wait(), 5)

        async def page_one_committed() -> bool:
            state = await storage.get_sync_state(page.id)
            return state is not None and state.last_cursor == C1

        await wait_for(page_one_committed, "page 1 to commit")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await storage.current_lock(page.id) is None  # released despite the cancellation
        assert len(await conversation_versions(storage, page.id)) == 3
        await assert_seed_checks(storage)

        del graph.hooks[C1]
        graph.requests.clear()
        result = await engine.sync("alice", request(page))
    assert graph.calls == [C1, C2, C3]
    assert result.inserted == 9 and result.has_more is False
    assert len(await conversation_versions(storage, page.id)) == 12
    await assert_seed_checks(storage)


async def test_lock_is_extended_while_the_sync_runs(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    held = graph.hold(C1)
    async with sync_engine(storage, router, replace(settings, sync_lock_ttl_seconds=0.6)) as (engine, _):
        task = asyncio.create_task(engine.sync("alice", request(page)))
        await asyncio.wait_for(held.answering.wait(), 5)
        first = await storage.current_lock(page.id)
        assert first is not None

        async def extended() -> bool:
            lease = await storage.current_lock(page.id)
            return lease is not None and lease.expires_at > first.expires_at

        await wait_for(extended, "the lease to be extended")
        assert await storage.acquire_sync_lock(page.id, "someone-else", 30) is None
        held.release.set()
        result = await asyncio.wait_for(task, 5)
    assert result.synced == 12


async def test_lease_taken_over_stops_the_sync(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    held = graph.hold(C1)
    async with sync_engine(storage, router, settings) as (engine, _):
        task = asyncio.create_task(engine.sync("alice", request(page)))
        await asyncio.wait_for(held.answering.wait(), 5)

        async def page_one_committed() -> bool:
            state = await storage.get_sync_state(page.id)
            return state is not None and state.last_cursor == C1

        await wait_for(page_one_committed, "page 1 to commit")
        # The holder looks crashed: its lease runs out and another sync takes the lock over.
        await execute(storage, "UPDATE sync_locks SET expires_at = 0 WHERE page_id = $1", page.id)
        intruder = await storage.acquire_sync_lock(page.id, "intruder", 30)
        assert intruder is not None
        held.release.set()
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(task, 5)
    holder = await storage.current_lock(page.id)
    assert holder is not None and holder.locked_by == "intruder"  # not released by the loser
    assert len(await conversation_versions(storage, page.id)) == 3  # page 2 was not written
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.last_cursor == C1


async def test_graph_auth_error_marks_the_token_and_blocks_until_re_registered(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    answers = chain(*WALK)
    answers[C1] = [graph_response(400, "error_190.json"), WALK[1]]
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, _):
        with pytest.raises(GraphAuthError):
            await engine.sync("alice", request(page))
        refreshed = await storage.get_page("alice", page.id)
        assert refreshed is not None and refreshed.token_status == "invalid"
        state = await storage.get_sync_state(page.id)
        assert state is not None and state.last_cursor == C1 and "graph_auth" in (state.last_error or "")
        assert await storage.current_lock(page.id) is None
        calls = len(graph.calls)
        with pytest.raises(GraphAuthError):
            await engine.sync("alice", request(page))
        assert len(graph.calls) == calls  # refused without calling Graph
        await storage.register_page("alice", PAGE_FB_ID, "EAAB-new-token", None)
        graph.requests.clear()
        result = await engine.sync("alice", request(page))
    assert graph.calls == [C1, C2, C3]
    assert result.session_id == state.sync_session_id and result.inserted == 9
    assert graph.requests[0].headers["authorization"] == "Bearer EAAB-new-token"
    await assert_seed_checks(storage)


async def test_rate_limit_past_the_budget_saves_the_cursor(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    usage = json.dumps(
        {
            PAGE_FB_ID: [
                {
                    "type": "messenger",
                    "call_count": 30,
                    "total_cputime": 5,
                    "total_time": 5,
                    "estimated_time_to_regain_access": 5,
                }
            ]
        }
    )
    answers = chain(*WALK)
    answers[C1] = [graph_response(400, "error_80006.json", {"x-business-use-case-usage": usage})]
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, fake):
        with pytest.raises(GraphRateLimited) as caught:
            await engine.sync("alice", request(page))
    assert caught.value.code == "graph_rate_limited" and fake.sleeps == []  # 5 min > the budget
    assert graph.calls == [None, C1]
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.last_cursor == C1 and not state.is_complete
    assert "graph_rate_limited" in (state.last_error or "")
    assert await storage.current_lock(page.id) is None
    await assert_seed_checks(storage)


async def test_server_errors_past_retries_answer_unavailable_then_a_rejected_cursor_restarts(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    answers = chain(*WALK)
    answers[C1] = [httpx.Response(503, text="<html>Service Unavailable</html>")]
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, fake):
        with pytest.raises(GraphUnavailable):
            await engine.sync("alice", request(page))
        assert graph.calls == [None] + [C1] * 5 and fake.sleeps == [0.5, 1.0, 2.0, 4.0]
        state = await storage.get_sync_state(page.id)
        assert state is not None and state.last_cursor == C1
        assert await storage.current_lock(page.id) is None
        # Next time Graph no longer accepts that cursor: the walk restarts from the top.
        answers[C1] = [graph_response(400, "error_100_cursor.json"), WALK[1]]
        graph.requests.clear()
        result = await engine.sync("alice", request(page))
    assert graph.calls == [C1, None, C1, C2, C3]
    assert result.session_id == state.sync_session_id
    assert (result.inserted, result.unchanged, result.has_more) == (9, 3, False)
    await assert_seed_checks(storage)


async def test_malformed_records_are_skipped_and_the_rest_kept(
    storage: Storage,
    page: Page,
    router: respx.MockRouter,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    answers = chain("conversations_page_malformed.json", "conversations_empty.json")
    FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, _):
        result = await engine.sync("alice", request(page))
    assert (result.synced, result.inserted, result.skipped) == (2, 2, 2)
    assert set(await conversation_versions(storage, page.id)) == {"7234519876543210", "5902318746501928"}
    assert "$.data[1].messages.data[0].created_time" in caplog.text and "$.data[2]" in caplog.text
    await assert_seed_checks(storage)


async def test_conversations_without_a_contact_or_messages_are_skipped(
    storage: Storage,
    page: Page,
    router: respx.MockRouter,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.engine")
    FakeGraph(router, {None: ["listing_unusable.json"]})
    async with sync_engine(storage, router, settings) as (engine, _):
        result = await engine.sync("alice", request(page))
    assert (result.synced, result.inserted, result.skipped) == (1, 1, 2)
    assert "t_10160411223344556" in caplog.text and "$.data[1]" in caplog.text and "$.data[2]" in caplog.text
    await assert_seed_checks(storage)


async def test_reduced_page_size_sticks_for_the_rest_of_the_walk(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    answers = chain(*WALK)
    answers[None] = [graph_response(500, "error_1_reduce_data.json"), WALK[0]]
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, _):
        result = await engine.sync("alice", request(page))
    assert result.synced == 12
    assert [r.url.params["limit"] for r in graph.requests] == ["100", "50", "50", "50", "50"]


# ---- a Graph that hangs: abandoned at the end of the budget -------------------------------------


async def test_graph_hanging_on_the_first_page_answers_unavailable_and_writes_nothing(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    held = graph.hold(None)  # never released
    async with sync_engine(storage, router, settings) as (engine, fake):
        task = asyncio.create_task(engine.sync("alice", request(page, max_duration_ms=2000)))
        await asyncio.wait_for(held.answering.wait(), 5)
        fake.now += 3.0  # the budget and one second pass; Graph still says nothing
        with pytest.raises(GraphUnavailable) as caught:
            await asyncio.wait_for(task, 5)
    assert caught.value.code == "graph_unavailable" and "time budget" in caught.value.message
    assert await storage.current_lock(page.id) is None
    assert await conversation_versions(storage, page.id) == {}
    state = await storage.get_sync_state(page.id)
    assert state is not None and not state.is_complete and state.last_cursor is None
    assert "graph_unavailable" in (state.last_error or "")


async def test_the_first_page_is_still_awaited_just_past_a_tiny_budget(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    held = graph.hold(None)
    async with sync_engine(storage, router, settings) as (engine, fake):
        task = asyncio.create_task(engine.sync("alice", request(page, max_duration_ms=1)))
        await asyncio.wait_for(held.answering.wait(), 5)
        fake.now += 0.5  # past the budget, within its grace: progress, not an error
        held.release.set()
        result = await asyncio.wait_for(task, 5)
    assert (result.synced, result.has_more) == (3, True)
    assert graph.calls == [None]  # no time left to ask for the next page
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.last_cursor == C1


async def test_graph_hanging_on_a_later_page_returns_has_more_with_the_cursor_saved(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    held = graph.hold(C1)  # page 2 never answers
    async with sync_engine(storage, router, settings) as (engine, fake):
        task = asyncio.create_task(engine.sync("alice", request(page, max_duration_ms=2000)))
        await asyncio.wait_for(held.answering.wait(), 5)

        async def page_one_committed() -> bool:
            state = await storage.get_sync_state(page.id)
            return state is not None and state.last_cursor == C1

        await wait_for(page_one_committed, "page 1 to commit")
        fake.now += 2.0  # the budget runs out while Graph answers page 2
        result = await asyncio.wait_for(task, 5)
        assert (result.synced, result.has_more) == (3, True)
        assert result.resume_session == result.session_id
        assert await storage.current_lock(page.id) is None
        state = await storage.get_sync_state(page.id)
        assert state is not None and state.last_cursor == C1 and state.last_error is None
        # Graph answers again: the next request fetches page 2 again and finishes.
        held.release.set()
        resumed = await engine.sync("alice", request(page, resume_session=result.resume_session))
    assert (resumed.synced, resumed.has_more) == (9, False)
    assert len(await conversation_versions(storage, page.id)) == 12


# ---- Retry-After ----------------------------------------------------------------------------------


async def test_retry_after_within_the_budget_is_waited(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    answers = chain(*WALK)
    answers[C1] = [httpx.Response(429, headers={"retry-after": "7"}), WALK[1]]
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, fake):
        result = await engine.sync("alice", request(page))
    assert fake.sleeps == [7.0] and graph.calls == [None, C1, C1, C2, C3]
    assert (result.synced, result.has_more) == (12, False)


async def test_retry_after_past_the_budget_is_the_502s_retry_after(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    answers = chain(*WALK)
    answers[C1] = [httpx.Response(429, headers={"retry-after": "120"})]
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, fake):
        with pytest.raises(GraphRateLimited) as caught:
            await engine.sync("alice", request(page))
    assert caught.value.to_json()["retryAfter"] == 120 and fake.sleeps == []
    assert graph.calls == [None, C1]
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.last_cursor == C1 and not state.is_complete
    assert await storage.current_lock(page.id) is None


# ---- paging.next without paging.cursors -----------------------------------------------------------


async def test_the_cursor_of_a_next_url_continues_the_walk(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    answers = chain(*WALK)
    answers[None] = ["conversations_next_only.json"]  # page 1 with paging.next only; its after is C1
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, _):
        result = await engine.sync("alice", request(page))
    assert (result.synced, result.has_more) == (12, False)
    assert graph.calls == [None, C1, C2, C3]
    assert all(r.url.host == "graph.test" and "access_token" not in str(r.url) for r in graph.requests)


async def test_a_next_page_without_a_cursor_answers_unavailable_and_is_never_complete(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    graph = FakeGraph(router, {None: ["conversations_next_without_after.json"]})
    async with sync_engine(storage, router, settings) as (engine, _):
        with pytest.raises(GraphUnavailable) as caught:
            await engine.sync("alice", request(page))
        assert "no cursor" in caught.value.message
        state = await storage.get_sync_state(page.id)
        assert state is not None and not state.is_complete and state.watermark is None
        assert "no cursor" in (state.last_error or "") and state.completed_syncs == 0
        assert await storage.current_lock(page.id) is None
        # Graph mends its paging: the same session goes on from the top.
        graph.answers.update(chain(*WALK))
        result = await engine.sync("alice", request(page))
    assert result.session_id == state.sync_session_id and result.synced == 12
    assert graph.calls == [None, None, C1, C2, C3]


# ---- sessions: resumeSession, mode ----------------------------------------------------------------


async def failed_at_page_two(
    engine: SyncEngine, storage: Storage, page: Page, answers: dict[str | None, list[Any]]
) -> str:
    """A sync that fails on page 2 (Graph answers 503 past retries); its session id."""
    answers[C1] = [httpx.Response(503)]
    with pytest.raises(GraphUnavailable):
        await engine.sync("alice", request(page))
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.last_cursor == C1 and not state.is_complete
    answers[C1] = [WALK[1]]
    return state.sync_session_id


@pytest.mark.parametrize("mode", ["full", "incremental"])
async def test_an_explicit_mode_after_a_failed_sync_starts_a_new_session(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings, mode: str
) -> None:
    answers = chain(*WALK)
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, _):
        failed = await failed_at_page_two(engine, storage, page, answers)
        graph.requests.clear()
        result = await engine.sync("alice", request(page, mode=mode))
    assert result.session_id != failed
    assert graph.calls == [None, C1, C2, C3]  # from the top
    assert (result.synced, result.inserted, result.unchanged) == (12, 9, 3)
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.mode == mode and state.is_complete


async def test_without_mode_a_failed_session_is_continued(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    answers = chain(*WALK)
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, _):
        failed = await failed_at_page_two(engine, storage, page, answers)
        graph.requests.clear()
        result = await engine.sync("alice", request(page))
    assert result.session_id == failed and graph.calls == [C1, C2, C3]
    assert (result.synced, result.inserted) == (9, 9)


@pytest.mark.parametrize("mode", ["full", "incremental"])
async def test_resume_session_continues_that_session_whatever_mode_it_carries(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings, mode: str
) -> None:
    answers = chain(*WALK)
    graph = FakeGraph(router, answers)
    async with sync_engine(storage, router, settings) as (engine, _):
        failed = await failed_at_page_two(engine, storage, page, answers)
        graph.requests.clear()
        result = await engine.sync("alice", request(page, resume_session=failed, mode=mode))
        assert result.session_id == failed and graph.calls == [C1, C2, C3]
        state = await storage.get_sync_state(page.id)
        assert state is not None and state.mode == "full"  # the session's own mode
        with pytest.raises(InvalidResumeSession):  # complete now
            await engine.sync("alice", request(page, resume_session=failed, mode=mode))
        with pytest.raises(InvalidResumeSession):
            await engine.sync("alice", request(page, resume_session="no-such-session", mode=mode))
    assert await storage.current_lock(page.id) is None


# ---- shutdown: aclose() lets go of the locks -------------------------------------------------------


@pytest.mark.parametrize("hangs_at", [None, C1], ids=["first-page", "later-page"])
async def test_aclose_stops_running_syncs_and_releases_their_locks(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings, hangs_at: str | None
) -> None:
    graph = FakeGraph(router, chain(*WALK))
    held = graph.hold(hangs_at)  # never released: Graph hangs when the service shuts down
    async with sync_engine(storage, router, settings) as (engine, _):
        task = asyncio.create_task(engine.sync("alice", request(page)))
        await asyncio.wait_for(held.answering.wait(), 5)
        if hangs_at == C1:

            async def page_one_committed() -> bool:
                state = await storage.get_sync_state(page.id)
                return state is not None and state.last_cursor == C1

            await wait_for(page_one_committed, "page 1 to commit")
        assert await storage.current_lock(page.id) is not None
        await asyncio.wait_for(engine.aclose(), 10)
        assert task.done()  # aclose waited for it
        with pytest.raises(ServiceUnavailable) as caught:
            await task  # the caller still gets an answer, not a cancellation
        assert await storage.current_lock(page.id) is None  # free in the database, not left for the TTL
        with pytest.raises(ServiceUnavailable):
            await engine.sync("alice", request(page))  # closed: no new sync starts
    assert caught.value.status_code == 503 and "shutting down" in caught.value.message
    state = await storage.get_sync_state(page.id)
    assert state is not None and not state.is_complete
    assert state.last_cursor == hangs_at  # what was written stays, the next sync goes on from there
    assert len(await conversation_versions(storage, page.id)) == (0 if hangs_at is None else 3)
    # Another process takes the lock at once and continues the session.
    assert await storage.acquire_sync_lock(page.id, "next-process", 30) is not None


async def test_aclose_without_running_syncs_returns_at_once(
    storage: Storage, page: Page, router: respx.MockRouter, settings: Settings
) -> None:
    FakeGraph(router, chain(*WALK))
    async with sync_engine(storage, router, settings) as (engine, _):
        assert (await engine.sync("alice", request(page))).synced == 12
        await asyncio.wait_for(engine.aclose(), 1)
    assert await storage.current_lock(page.id) is None


async def test_a_page_deleted_as_its_sync_starts_is_not_found(
    storage: Storage,
    page: Page,
    router: respx.MockRouter,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acquire = storage.acquire_sync_lock

    async def deleted_first(page_id: str, locked_by: str, ttl_seconds: float) -> Any:
        assert await storage.delete_page("alice", page_id)  # DELETE /api/pages/{id} lands here
        return await acquire(page_id, locked_by, ttl_seconds)

    monkeypatch.setattr(storage, "acquire_sync_lock", deleted_first)
    FakeGraph(router, chain(*WALK))
    async with sync_engine(storage, router, settings) as (engine, _):
        with pytest.raises(NotFound):
            await engine.sync("alice", request(page))
    assert await storage.find_page(page.id) is None and await storage.current_lock(page.id) is None
