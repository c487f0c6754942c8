"""The scheduler: pages kept complete with no sync call, across replicas, within one quota.

Scheduler instances are driven directly, each with its own storage connections, SyncEngine,
GraphClient and PooledTransport (two instances on one PostgreSQL database stand for two
replicas), over httpx.ASGITransport to the Graph stand-in behind its limits, which records every
request. No timing assertions: waits are bounded, and what is asserted is what the stand-in and
the database recorded.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import pytest

from bench.standin_limits import Fault, bench_page_ids
from core.errors import SyncInProgress
from schema.api import SyncRequest
from storage.base import Page
from sync.status import PageStatus, page_statuses
from tests.helpers import ROOT
from tests.helpers.autopilot import (
    Instance,
    Store,
    autopilot_settings,
    conversation_counts,
    instance,
    limited_standin,
    open_store,
    register_pages,
    sync_rows,
    wait_until,
)
from tests.helpers.storage import execute, schedule_of

CONVERSATIONS = 5  # with SYNC_PAGE_SIZE=2: three Graph calls per page


async def statuses(worker: Instance, settings: object) -> dict[str, PageStatus]:
    found = await page_statuses(worker.storage, settings, "alice")  # type: ignore[arg-type]
    return {s.page_id: s for s in found}


async def all_complete(storage: Store, pages: Sequence[Page], conversations: int = CONVERSATIONS) -> bool:
    rows = await sync_rows(storage, [p.id for p in pages])
    counts = await conversation_counts(storage)
    return all(
        p.id in rows and rows[p.id]["completed_syncs"] >= 1 and counts.get(p.id) == conversations
        for p in pages
    )


def progress(storage: Store, pages: Sequence[Page]) -> Callable[[], Awaitable[str]]:
    async def describe() -> str:
        rows = await sync_rows(storage, [p.id for p in pages])
        done = sum(1 for r in rows.values() if r["completed_syncs"] >= 1)
        return f"{done} of {len(pages)} pages complete; states {[dict(r) for r in rows.values()][:3]}"

    return describe


async def test_registered_pages_complete_by_themselves(db_url: str) -> None:
    settings = autopilot_settings(db_url)
    standin = limited_standin(CONVERSATIONS)
    async with instance(db_url, standin, settings) as worker:
        pages = await register_pages(worker.storage, 20)
        await worker.scheduler.start()  # nobody calls the sync API
        await wait_until(lambda: all_complete(worker.storage, pages), 30, progress(worker.storage, pages))
        await worker.scheduler.run_until_idle(10)  # the last syncs let go of their locks
        shown = await statuses(worker, settings)
        await worker.scheduler.refresh_gauges()
        by_phase = {
            phase: worker.metrics.pages.labels(phase)._value.get() for phase in ("idle", "backfilling")
        }  # type: ignore[attr-defined]

    for page in pages:
        assert standin.max_in_flight[page.facebook_page_id] == 1  # never walked by two syncs at once
        assert len(standin.requests[page.facebook_page_id]) == 3  # each walked once
        status = shown[page.id]
        assert (status.phase, status.conversations, status.last_error) == ("idle", CONVERSATIONS, None)
        assert status.last_complete_sync_at is not None and status.next_run_at is not None
        assert status.next_run_at - status.last_complete_sync_at == 3_600_000
    assert standin.refused == {}
    assert by_phase == {"idle": 20, "backfilling": 0}


@pytest.mark.postgres_only
async def test_two_instances_share_the_pages_and_each_pages_ceiling(db_url: str) -> None:
    settings = autopilot_settings(db_url, graph_page_calls_per_second=2.0, sync_concurrency=6)
    standin = limited_standin(CONVERSATIONS, page_calls_per_second=2, app_calls_per_second=40)
    async with instance(db_url, standin, settings) as a, instance(db_url, standin, settings) as b:
        pages = await register_pages(a.storage, 20)
        await asyncio.gather(a.scheduler.start(), b.scheduler.start())
        await wait_until(lambda: all_complete(a.storage, pages), 40, progress(a.storage, pages))
        rows = await sync_rows(a.storage, [p.id for p in pages])
        done = [w.metrics.syncs.labels("complete")._value.get() for w in (a, b)]  # type: ignore[attr-defined]

    assert {r["completed_syncs"] for r in rows.values()} == {1}  # each page completed once
    assert sum(done) == 20 and min(done) > 0, done  # and both replicas did some of the work
    assert standin.refused == {}, standin.refused
    for page in pages:
        # 2 calls a second per page across both replicas; the margin allows for the stand-in's clock.
        assert standin.max_in_window(page.facebook_page_id, 0.98) <= 2, sorted(
            standin.requests[page.facebook_page_id]
        )
        assert standin.max_in_flight[page.facebook_page_id] == 1


@pytest.mark.postgres_only
async def test_a_throttled_page_waits_on_both_instances_while_the_others_go_on(db_url: str) -> None:
    settings = autopilot_settings(
        db_url, graph_page_calls_per_second=2.0, sync_concurrency=4, sync_time_budget_seconds=1.5
    )
    standin = limited_standin(7, page_calls_per_second=2, app_calls_per_second=40)  # four calls a page
    throttled = bench_page_ids(1)[0]
    standin.fail_at(throttled, 2, Fault(80006, regain_seconds=3))
    async with instance(db_url, standin, settings) as a, instance(db_url, standin, settings) as b:
        pages = await register_pages(a.storage, 8)
        page = pages[0]
        await asyncio.gather(a.scheduler.start(), b.scheduler.start())

        async def held() -> bool:
            return (await statuses(b, settings))[page.id].phase == "rate_limited"

        await wait_until(held, 10, "the throttled page never showed as rate_limited")
        status = (await statuses(a, settings))[page.id]
        await wait_until(lambda: all_complete(a.storage, pages, 7), 40, progress(a.storage, pages))

    assert status.phase == "rate_limited" and status.until is not None
    refused_at = standin.requests[throttled][1]
    after = [t for t in standin.requests[throttled] if t > refused_at]
    assert standin.while_throttled[throttled] == 0  # neither replica called Graph for it meanwhile
    assert after and after[0] >= refused_at + 3 - 0.05
    during = [
        t for p in pages[1:] for t in standin.requests[p.facebook_page_id] if refused_at < t < refused_at + 3
    ]
    assert during, "the other pages did not go on while one was throttled"
    assert standin.refused == {(throttled, 80006): 1}


async def test_a_refused_token_pauses_the_page_until_it_is_registered_again(db_url: str) -> None:
    settings = autopilot_settings(db_url)
    standin = limited_standin(CONVERSATIONS)
    async with instance(db_url, standin, settings) as worker:
        pages = await register_pages(worker.storage, 3)
        page = pages[0]
        standin.fail_at(page.facebook_page_id, 2, Fault(190))
        await worker.scheduler.run_until_idle(30)
        paused = (await statuses(worker, settings))[page.id]
        state = (await sync_rows(worker.storage, [page.id]))[page.id]
        assert await worker.scheduler.run_once() == 0  # it waits: no retry, no hot loop

        await worker.storage.register_page("alice", page.facebook_page_id, "EAAB-a-new-token", None)
        await worker.scheduler.run_until_idle(30)
        resumed = (await sync_rows(worker.storage, [page.id]))[page.id]
        others = await statuses(worker, settings)

    assert (paused.phase, paused.token_status, paused.next_run_at) == (
        "paused_token_invalid",
        "invalid",
        None,
    )
    assert paused.last_error is not None and "190" in paused.last_error
    assert paused.backfill_progress == 2 and paused.conversations == 2
    cursor = state["last_cursor"]
    afters = standin.afters[page.facebook_page_id]
    assert cursor is not None and afters[:3] == [None, cursor, cursor]  # resumed from its cursor
    assert resumed["sync_session_id"] == state["sync_session_id"] and resumed["completed_syncs"] == 1
    assert all(others[p.id].phase == "idle" and others[p.id].conversations == CONVERSATIONS for p in pages)


async def test_other_failures_back_off_then_the_page_recovers(db_url: str) -> None:
    settings = autopilot_settings(db_url)
    standin = limited_standin(CONVERSATIONS)
    async with instance(db_url, standin, settings, backoff_base_seconds=1.0) as worker:
        (page,) = await register_pages(worker.storage, 1)
        standin.fail_at(page.facebook_page_id, 1, Fault(100))  # an error retries cannot cure
        assert await worker.scheduler.run_once() == 1
        await worker.scheduler.run_until_idle(10)
        failed = (await statuses(worker, settings))[page.id]
        entry = await schedule_of(worker.storage, page.id)
        assert await worker.scheduler.run_once() == 0  # backing off, not retrying at once
        await worker.scheduler.start()

        async def recovered_ok() -> bool:
            entry = await schedule_of(worker.storage, page.id)
            return entry is not None and entry.outcome == "ok" and await all_complete(worker.storage, [page])

        await wait_until(recovered_ok, 15, progress(worker.storage, [page]))
        recovered = await schedule_of(worker.storage, page.id)

    assert failed.phase == "error" and failed.until is not None and failed.next_run_at == failed.until
    assert failed.last_error is not None and "graph_request" in failed.last_error
    assert entry is not None and entry.failures == 1 and entry.not_before is not None
    assert 999 <= entry.not_before - entry.updated_at <= 1001  # the first backoff step
    assert recovered is not None and (recovered.outcome, recovered.failures) == ("ok", 0)
    assert len(standin.requests[page.facebook_page_id]) == 4  # one failure, then the three-call walk


async def test_a_manual_sync_is_refused_while_a_scheduled_one_holds_the_page(db_url: str) -> None:
    settings = autopilot_settings(db_url)
    standin = limited_standin(CONVERSATIONS, latency_ms=200)
    async with instance(db_url, standin, settings) as worker:
        (page,) = await register_pages(worker.storage, 1)
        assert await worker.scheduler.run_once() == 1

        async def locked() -> bool:
            return await worker.storage.current_lock(page.id) is not None

        await wait_until(locked, 10, "the scheduled sync never took the lock")
        with pytest.raises(SyncInProgress):
            await worker.engine.sync(
                "alice", SyncRequest(page_id=page.id, facebook_page_id=page.facebook_page_id)
            )
        running = (await statuses(worker, settings))[page.id]
        await worker.scheduler.run_until_idle(20)
    assert running.syncing and running.phase == "backfilling" and running.next_run_at is None
    assert len(standin.requests[page.facebook_page_id]) == 3


async def test_two_users_rows_of_one_page_share_its_quota(db_url: str) -> None:
    settings = autopilot_settings(db_url, graph_page_calls_per_second=5.0)
    standin = limited_standin(CONVERSATIONS, page_calls_per_second=5)
    async with instance(db_url, standin, settings) as worker:
        alices = await register_pages(worker.storage, 1, user="alice")
        bobs = await register_pages(worker.storage, 1, user="bob")
        await worker.scheduler.run_until_idle(20)
        complete = await all_complete(worker.storage, [*alices, *bobs])
    fb = alices[0].facebook_page_id
    assert complete and bobs[0].facebook_page_id == fb
    assert len(standin.requests[fb]) == 6 and standin.max_in_window(fb) <= 5
    assert standin.refused == {}


async def test_without_an_interval_nothing_syncs_but_housekeeping_runs(db_url: str) -> None:
    settings = autopilot_settings(db_url, sync_interval_seconds=0.0)
    standin = limited_standin(CONVERSATIONS)
    async with instance(db_url, standin, settings, retention_batch=2) as worker:
        (page,) = await register_pages(worker.storage, 1)
        assert await worker.storage.acquire_sync_lock(page.id, "a-dead-replica", 0.001) is not None
        await asyncio.sleep(0.01)  # that lease expires
        for i in range(3):
            await execute(
                worker.storage,
                "INSERT INTO webhook_events (body, body_sha256, status, received_at) "
                "VALUES ($1, $2, 'applied', now_ms() - $3)",
                b"{}",
                f"sha-{i}",
                31 * 86_400_000,
            )
        await worker.scheduler.start()
        assert await worker.scheduler.run_once() == 0

        async def cleaned() -> bool:
            async with worker.storage.engine.reader() as conn:
                left = await conn.fetch("SELECT id FROM webhook_events")
                lock = await conn.fetchrow("SELECT locked_by FROM sync_locks WHERE page_id = $1", page.id)
            return not left and lock is not None and lock["locked_by"] is None

        await wait_until(cleaned, 10, "housekeeping did not run")
        shown = (await statuses(worker, settings))[page.id]
    assert standin.requests == {}
    assert (shown.phase, shown.next_run_at, shown.syncing) == ("backfilling", None, False)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(proc.wait(), 10)


async def test_a_crash_mid_backfill_is_resumed_by_another_instance_after_the_lease_expires(
    db_url: str,
) -> None:
    store = await open_store(db_url)
    try:
        (page,) = await register_pages(store, 1)
    finally:
        await store.close()
    # A replica in a process of its own, slowed down so that it is killed mid-backfill.
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.helpers.autopilot",
        "crash-worker",
        db_url,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    settings = autopilot_settings(db_url, sync_lock_ttl_seconds=2.0)
    standin = limited_standin(40)
    try:
        async with instance(db_url, standin, settings) as survivor:

            async def mid_backfill() -> bool:
                state = (await sync_rows(survivor.storage, [page.id])).get(page.id)
                return state is not None and state["total_synced"] >= 6 and not state["is_complete"]

            await wait_until(mid_backfill, 30, "the other process never got half-way")
            await _kill(child)
            crashed = (await sync_rows(survivor.storage, [page.id]))[page.id]
            await survivor.scheduler.start()
            await wait_until(
                lambda: all_complete(survivor.storage, [page], 40), 20, progress(survivor.storage, [page])
            )
            await survivor.scheduler.run_until_idle(10)
            resumed = (await sync_rows(survivor.storage, [page.id]))[page.id]
            lock = await survivor.storage.current_lock(page.id)
    finally:
        await _kill(child)
    assert not crashed["is_complete"] and crashed["last_cursor"] is not None
    assert standin.afters[page.facebook_page_id][0] == crashed["last_cursor"]  # from where it stopped
    assert resumed["sync_session_id"] == crashed["sync_session_id"] and resumed["completed_syncs"] == 1
    assert lock is None  # and let go
