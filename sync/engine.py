"""The sync engine: a resumable, locked, incremental backfill of a Page's conversations.

    SyncEngine.sync(user_id, SyncRequest)
      page, token and session checks     404 / 400 / 502 graph_auth / 400 invalid_resume_session
      acquire the page's lock            409 sync_in_progress (a heartbeat extends the lease)
      walk Graph pages, newest first, from the saved cursor:
          fetch page n+1 (a task)   ||   write page n with its next cursor (one fenced transaction)
      stop when: the last page is written, or the watermark is reached (incremental)   -> complete
                 the time budget would run out before another page                     -> hasMore
                 Graph fails past retries (cursor and last_error saved)                 -> 502
                 the lease was taken over                                               -> 409 lease_lost
      release the lock on every path, cancellation included

The first page of a request is always awaited, so every request makes progress however small
its budget; later pages are cut off at the budget and fetched again by the next request.
``sync_command.py`` runs the same sync from a terminal (``python app.py sync PAGE_ID``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import (
    BadRequest,
    GraphAuthError,
    GraphCursorRejected,
    GraphError,
    InvalidResumeSession,
    LeaseLost,
    NotFound,
    ServiceError,
    SyncInProgress,
)
from core.metrics import Metrics
from core.records import ConversationRecord
from core.settings import Settings
from schema.api import SyncRequest
from storage import Storage
from storage.base import Lease, Page, SyncProgress, SyncState, WriteCounts
from sync.graph_client import ConversationsPage, GraphClient
from sync.graph_records import conversation_to_record

log = logging.getLogger(__name__)

TOKEN_INVALID = "Facebook refused the page's access token (code 190); register a new one with POST /api/pages"
MAX_CURSOR_RESTARTS = 1  # per request: a cursor Graph rejects restarts the walk from the top once
_DATA_INDEX = re.compile(r"^\$\.data\[(\d+)\]")

ProgressCallback = Callable[[int], None]  # conversations synced so far by this request


@dataclass
class _Run:
    """What one sync request has done so far."""

    session_id: str
    cursor: str | None  # the cursor of the next page to fetch (saved after every page)
    session_watermark: int | None
    counts: WriteCounts = field(default_factory=WriteCounts)
    synced: int = 0
    skipped: int = 0
    has_more: bool = False


class _LeaseKeeper:
    """Extends the lease every third of its TTL while the sync runs; notices a takeover."""

    def __init__(self, storage: Storage, lease: Lease, ttl: float) -> None:
        self._storage, self._lease, self._ttl = storage, lease, ttl
        self.lost = False
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self._ttl / 3))
            try:
                extended = await self._storage.extend_sync_lock(self._lease, self._ttl)
            except Exception:  # a database hiccup: try again next beat, the lease has time left
                log.warning("could not extend the sync lock of page %s", self._lease.page_id, exc_info=True)
                continue
            if extended is None:
                self.lost = True
                return

    def check(self) -> None:
        """Raise LeaseLost if a beat found the lease taken over."""
        if self.lost:
            raise LeaseLost("The sync lock was taken over by another sync; this one stopped")

    async def stop(self) -> None:
        """Stop beating."""
        await _discard(self._task)


async def _discard(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait for it, swallowing its outcome (but not our own cancellation)."""
    if task.done():
        if not task.cancelled():
            task.exception()  # mark it retrieved
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:  # the task's own failure no longer matters
        pass


def _source_indexes(page: ConversationsPage) -> list[int]:
    """The `$.data[i]` index of each valid record (the skipped ones are not in `records`)."""
    bad = {int(m.group(1)) for path, _ in page.skipped if (m := _DATA_INDEX.match(path))}
    indexes, i = [], 0
    for _ in page.records:
        while i in bad:
            i += 1
        indexes.append(i)
        i += 1
    return indexes


class SyncEngine:
    """Runs syncs for the API and the CLI. ``clock`` must be the GraphClient's clock (deadlines)."""

    def __init__(
        self,
        storage: Storage,
        graph: GraphClient,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._storage = storage
        self._graph = graph
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._instance = f"{socket.gethostname()}:{os.getpid()}"

    async def sync(
        self, user_id: str, request: SyncRequest, *, on_page: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Run (or continue) the page's sync within the time budget; the SPEC's response body."""
        started = self._clock()
        try:
            page = await self._storage.get_page(user_id, request.page_id)
            if page is None:
                raise NotFound("Page not found")
            if request.facebook_page_id != page.facebook_page_id:
                raise BadRequest("facebookPageId does not match the page")
            if page.token_status == "invalid":
                raise GraphAuthError(TOKEN_INVALID, graph_code=190)
            budget = self._settings.sync_time_budget_seconds
            if request.max_duration_ms is not None:
                budget = min(budget, request.max_duration_ms / 1000)
            run = await self._locked_sync(user_id, page, request, started + budget, on_page)
        except ServiceError as exc:
            self._metrics.sync_runs.labels(exc.code).inc()
            raise
        self._metrics.sync_runs.labels("partial" if run.has_more else "complete").inc()
        for name in ("inserted", "updated", "unchanged"):
            self._metrics.sync_conversations.labels(name).inc(getattr(run.counts, name))
        self._metrics.sync_conversations.labels("skipped").inc(run.skipped)
        return {
            "success": True,
            "synced": run.synced,
            "inserted": run.counts.inserted,
            "updated": run.counts.updated,
            "unchanged": run.counts.unchanged,
            "skipped": run.skipped,
            "eventsInserted": run.counts.events_inserted,
            "hasMore": run.has_more,
            "resumeSession": run.session_id if run.has_more else None,
            "syncSessionId": run.session_id,
            "durationMs": max(0, round((self._clock() - started) * 1000)),
        }

    async def _locked_sync(
        self,
        user_id: str,
        page: Page,
        request: SyncRequest,
        deadline: float,
        on_page: ProgressCallback | None,
    ) -> _Run:
        lease = await self._acquire(page.id)
        keeper = _LeaseKeeper(self._storage, lease, self._settings.sync_lock_ttl_seconds)
        try:
            state = await self._open_session(lease, user_id, request)
            run = _Run(state.sync_session_id, state.last_cursor, state.session_watermark)
            watermark = state.watermark if state.mode == "incremental" else None
            try:
                await self._walk(page, lease, keeper, run, watermark, deadline, on_page)
            except GraphError as exc:
                await self._record_failure(page, lease, run, exc)
                raise
            return run
        finally:
            # Shielded: a cancelled request still lets go of its lock.
            await asyncio.shield(self._let_go(keeper, lease))

    async def _acquire(self, page_id: str) -> Lease:
        locked_by = f"{self._instance}:{uuid.uuid4().hex[:8]}"
        for _ in range(3):  # the holder may let go between our two statements
            lease = await self._storage.acquire_sync_lock(
                page_id, locked_by, self._settings.sync_lock_ttl_seconds
            )
            if lease is not None:
                return lease
            holder = await self._storage.current_lock(page_id)
            if holder is not None:
                raise SyncInProgress("Sync already in progress", expiresAt=holder.expires_at)
        raise SyncInProgress("Sync already in progress", expiresAt=None)

    async def _let_go(self, keeper: _LeaseKeeper, lease: Lease) -> None:
        await keeper.stop()
        try:
            await self._storage.release_sync_lock(lease)
        except Exception:  # it expires on its own; never hide the sync's own outcome
            log.exception("could not release the sync lock of page %s", lease.page_id)

    async def _open_session(self, lease: Lease, user_id: str, request: SyncRequest) -> SyncState:
        state = await self._storage.get_sync_state(lease.page_id)
        if request.resume_session is not None:
            if state is None or state.sync_session_id != request.resume_session or state.is_complete:
                raise InvalidResumeSession("resumeSession is unknown or already complete")
            return state
        if state is not None and not state.is_complete:
            return state  # an unfinished session is continued
        mode = request.mode or (
            "incremental" if state is not None and state.watermark is not None else "full"
        )
        return await self._storage.start_sync_session(lease, user_id, str(uuid.uuid4()), mode)

    def _fetch(
        self, page: Page, cursor: str | None, limit: int, deadline: float
    ) -> asyncio.Task[ConversationsPage]:
        async def fetch() -> ConversationsPage:
            try:
                result = await self._graph.fetch_conversations(
                    page.facebook_page_id, page.access_token, after=cursor, limit=limit, deadline=deadline
                )
            except GraphError as exc:
                self._metrics.graph_requests.labels(exc.code).inc()
                raise
            self._metrics.graph_requests.labels("ok").inc()
            return result

        return asyncio.create_task(fetch())

    async def _walk(
        self,
        page: Page,
        lease: Lease,
        keeper: _LeaseKeeper,
        run: _Run,
        watermark: int | None,
        deadline: float,
        on_page: ProgressCallback | None,
    ) -> None:
        limit = self._settings.sync_page_size
        restarts = 0
        first = True
        last_commit, slowest = self._clock(), 0.0
        fetch: asyncio.Task[ConversationsPage] | None = self._fetch(page, run.cursor, limit, deadline)
        try:
            while fetch is not None:
                if not first and not fetch.done():
                    await asyncio.wait({fetch}, timeout=max(0.0, deadline - self._clock()))
                    if not fetch.done():  # the budget ran out while Graph answered
                        run.has_more = True
                        return
                try:
                    result = await fetch
                except GraphCursorRejected:
                    if run.cursor is None or restarts >= MAX_CURSOR_RESTARTS:
                        raise
                    restarts += 1
                    log.warning(
                        "Graph rejected the saved cursor of page %s; restarting from the top", page.id
                    )
                    run.cursor = None
                    fetch = self._fetch(page, None, limit, deadline)
                    continue
                first = False
                limit = result.limit_used  # stays reduced after "reduce the amount of data"
                records, skipped, newest, reached = self._records(page, result, watermark)
                if newest is not None:
                    run.session_watermark = max(newest, run.session_watermark or newest)
                next_cursor = None if reached else result.next_cursor
                # Fetch the next page while this one is written.
                fetch = None
                if next_cursor is not None and self._clock() < deadline:
                    fetch = self._fetch(page, next_cursor, limit, deadline)
                keeper.check()
                synced = len({r.sender_id for r in records})
                progress = SyncProgress(
                    last_cursor=next_cursor,
                    synced=synced,
                    session_watermark=run.session_watermark,
                    is_complete=next_cursor is None,
                )
                run.counts.add(await self._storage.save_conversation_page(lease, records, progress))
                run.cursor, run.synced, run.skipped = next_cursor, run.synced + synced, run.skipped + skipped
                if on_page is not None:
                    on_page(run.synced)
                if next_cursor is None:
                    return
                now = self._clock()
                slowest, last_commit = max(slowest, now - last_commit), now
                if fetch is None or now + slowest > deadline:
                    run.has_more = True
                    return
        finally:
            if fetch is not None:
                await _discard(fetch)

    def _records(
        self, page: Page, result: ConversationsPage, watermark: int | None
    ) -> tuple[list[ConversationRecord], int, int | None, bool]:
        """(records, skipped, newest updated_time seen, watermark reached) for one Graph page."""
        records: list[ConversationRecord] = []
        newest: int | None = None
        stop_at: int | None = None
        unusable = 0
        for conv, index in zip(result.records, _source_indexes(result), strict=True):
            updated = conv.updated_time_ms
            if watermark is not None and updated <= watermark:
                stop_at = index  # conversations arrive newest first: the rest is already stored
                break
            newest = updated if newest is None else max(newest, updated)
            record = conversation_to_record(conv, page.facebook_page_id)
            if record is None:
                unusable += 1
                log.warning(
                    "Skipped conversation %s of page %s at $.data[%d]: no contact participant or no messages",
                    conv.id,
                    page.id,
                    index,
                )
                continue
            records.append(record)
        invalid = 0
        for path, _ in result.skipped:  # logged with their paths by the Graph client
            m = _DATA_INDEX.match(path)
            if stop_at is None or m is None or int(m.group(1)) < stop_at:
                invalid += 1
        return records, unusable + invalid, newest, stop_at is not None

    async def _record_failure(self, page: Page, lease: Lease, run: _Run, exc: GraphError) -> None:
        """After a Graph failure: the token's status (190), the cursor reached and the error."""
        log.warning("sync of page %s stopped: %s", page.id, exc.message)
        if isinstance(exc, GraphAuthError):
            await self._storage.mark_token_invalid(page.id)
        progress = SyncProgress(
            last_cursor=run.cursor,
            synced=0,
            session_watermark=run.session_watermark,
            last_error=f"{exc.code}: {exc.message}"[:2000],
        )
        try:
            await self._storage.save_sync_progress(lease, progress)
        except LeaseLost:
            log.warning("sync of page %s lost its lease before saving the error", page.id)
