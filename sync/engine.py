"""The sync engine: a resumable, locked, incremental backfill of a Page's conversations.

    SyncEngine.sync(user_id, SyncRequest)
      page, token and session checks     404 / 400 / 502 graph_auth / 400 invalid_resume_session
      acquire the page's lock            409 sync_in_progress (a heartbeat extends the lease)
      walk Graph pages, newest first, from the saved cursor:
          fetch page n+1 (a task)   ||   write page n with its next cursor (one fenced transaction)
      stop when: the last page is written, or the watermark is reached (incremental)   -> complete
                 the time budget would run out before another page                     -> hasMore
                 Graph fails past retries (cursor and last_error saved)                 -> 502
                 Graph's paging gives no way forward                                    -> 502
                 the lease was taken over                                               -> 409 lease_lost
                 the engine is closed (shutdown)                                        -> 503
      release the lock on every path, cancellation included (sync/lease.py)

No Graph call holds a request past its budget: a later page that has not answered by the end
of the budget is abandoned (hasMore; the next request fetches it again), and the first page,
which is awaited a little longer so that every request makes progress however small its
budget, is abandoned ``ABANDON_GRACE_SECONDS`` after it (502 graph_unavailable: no page was
written). ``sync/command.py`` runs the same sync from a terminal (``python app.py sync PAGE_ID``).

Sessions (SPEC, POST /api/conversations/sync): ``resumeSession`` continues that session
whatever ``mode`` says; without it, an explicit ``mode`` starts a new session of that mode,
and no ``mode`` continues an unfinished session or starts one (incremental once a sync has
completed, else full).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from core.errors import (
    BadRequest,
    GraphAuthError,
    GraphCursorRejected,
    GraphError,
    GraphUnavailable,
    InvalidResumeSession,
    LeaseLost,
    NotFound,
    ServiceError,
    ServiceUnavailable,
)
from core.metrics import Metrics
from core.records import ConversationRecord
from core.settings import Settings
from schema.api import SyncRequest
from storage import Storage
from storage.base import Lease, Page, SyncProgress, SyncState, WriteCounts
from sync.graph_client import ConversationsPage, GraphClient
from sync.graph_records import conversation_to_record
from sync.lease import LeaseKeeper, Leases, discard

log = logging.getLogger(__name__)

TOKEN_INVALID = "Facebook refused the page's access token (code 190); register a new one with POST /api/pages"
MAX_CURSOR_RESTARTS = 1  # per request: a cursor Graph rejects restarts the walk from the top once
# The first page may answer this long after the budget; then it is abandoned. Under a second,
# so that saving the error and releasing the lock still end within a second of the budget.
ABANDON_GRACE_SECONDS = 0.9
CLOSE_TIMEOUT_SECONDS = 5.0  # aclose() waits this long at most for the syncs to let go of their locks
GRAPH_TOO_SLOW = "Graph did not answer within the sync's time budget; nothing was written, try again"
SHUTTING_DOWN = "The service is shutting down; the sync stopped at its last saved page, try again shortly"
_DATA_INDEX = re.compile(r"^\$\.data\[(\d+)\]")

ProgressCallback = Callable[[int], None]  # conversations synced so far by this request


@dataclass(frozen=True)
class SyncResult:
    """What one sync call did (routes/sync.py turns it into the SPEC's response body)."""

    session_id: str
    synced: int
    inserted: int
    updated: int
    unchanged: int
    skipped: int
    events_inserted: int
    has_more: bool
    duration_ms: int

    @property
    def resume_session(self) -> str | None:
        """The session to resume while there is more to fetch, else None."""
        return self.session_id if self.has_more else None


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
    """Runs syncs for the API and the CLI. ``clock`` must be the GraphClient's clock (deadlines).

    ``alarm(seconds)`` waits that many seconds of ``clock``'s time (``asyncio.sleep`` for the
    real clock); it is what abandons a Graph call at the end of the budget, and tests that
    drive a fake clock pass one that fires when the fake time passes.
    """

    def __init__(
        self,
        storage: Storage,
        graph: GraphClient,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        alarm: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._storage = storage
        self._graph = graph
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._alarm = alarm
        self._leases = Leases(storage, settings.sync_lock_ttl_seconds)
        self._running: set[asyncio.Task[SyncResult]] = set()
        self._closed = False

    async def sync(
        self, user_id: str, request: SyncRequest, *, on_page: ProgressCallback | None = None
    ) -> SyncResult:
        """Run (or continue) the page's sync within the time budget; what it did.

        After ``aclose`` (or when it stops this sync) raises ServiceUnavailable (503).
        """
        if self._closed:
            raise ServiceUnavailable(SHUTTING_DOWN)
        # Its own task, so that aclose() can stop it without cancelling the caller (which still
        # answers, with a 503); cancelling the caller cancels it too.
        task = asyncio.create_task(self._sync(user_id, request, on_page))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._closed and task.cancelled() and not (current is not None and current.cancelling()):
                self._metrics.sync_runs.labels(ServiceUnavailable.code).inc()
                raise ServiceUnavailable(SHUTTING_DOWN) from None
            raise

    async def aclose(self) -> None:
        """Stop the syncs this engine runs and wait (a few seconds at most) until their locks are released.

        For the shutdown, before storage closes: a sync killed with the process would keep its
        page locked for the lock's whole TTL. Syncs asked for afterwards answer 503.
        """
        self._closed = True
        loop = asyncio.get_running_loop()
        until = loop.time() + CLOSE_TIMEOUT_SECONDS
        running = set(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=CLOSE_TIMEOUT_SECONDS)
        released = await self._leases.wait_released(max(0.0, until - loop.time()))
        if self._running or not released:
            log.warning("shutdown: a sync did not let go of its lock in time; it expires with its lease")
            await self._leases.abandon()

    async def _sync(self, user_id: str, request: SyncRequest, on_page: ProgressCallback | None) -> SyncResult:
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
            try:
                run = await self._locked_sync(user_id, page, request, started + budget, on_page)
            except ServiceError:
                raise
            except Exception:
                # DELETE /api/pages/{id} between the checks above and the lease: the lock or
                # session row then refers to no page (a foreign-key error), which is a 404.
                if await self._storage.get_page(user_id, request.page_id) is None:
                    raise NotFound("Page not found") from None
                raise
        except ServiceError as exc:
            self._metrics.sync_runs.labels(exc.code).inc()
            raise
        self._metrics.sync_runs.labels("partial" if run.has_more else "complete").inc()
        for name in ("inserted", "updated", "unchanged"):
            self._metrics.sync_conversations.labels(name).inc(getattr(run.counts, name))
        self._metrics.sync_conversations.labels("skipped").inc(run.skipped)
        result = SyncResult(
            session_id=run.session_id,
            synced=run.synced,
            inserted=run.counts.inserted,
            updated=run.counts.updated,
            unchanged=run.counts.unchanged,
            skipped=run.skipped,
            events_inserted=run.counts.events_inserted,
            has_more=run.has_more,
            duration_ms=max(0, round((self._clock() - started) * 1000)),
        )
        log.info(
            "sync step of page %s: %d synced, %s",
            page.id,
            result.synced,
            "more to fetch" if result.has_more else "complete",
            extra={
                "page_id": page.id,
                "user_id": user_id,
                "session_id": result.session_id,
                "synced": result.synced,
                "inserted": result.inserted,
                "updated": result.updated,
                "unchanged": result.unchanged,
                "skipped": result.skipped,
                "events_inserted": result.events_inserted,
                "has_more": result.has_more,
                "duration_ms": result.duration_ms,
            },
        )
        return result

    async def _locked_sync(
        self,
        user_id: str,
        page: Page,
        request: SyncRequest,
        deadline: float,
        on_page: ProgressCallback | None,
    ) -> _Run:
        lease = await self._leases.acquire(page.id)
        keeper = self._leases.keep(lease)
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
            await self._leases.let_go(keeper, lease)  # completes even when this sync is cancelled

    async def _open_session(self, lease: Lease, user_id: str, request: SyncRequest) -> SyncState:
        state = await self._storage.get_sync_state(lease.page_id)
        if request.resume_session is not None:  # that session, whatever `mode` says
            if state is None or state.sync_session_id != request.resume_session or state.is_complete:
                raise InvalidResumeSession("resumeSession is unknown or already complete")
            return state
        if request.mode is None and state is not None and not state.is_complete:
            return state  # an unfinished session is continued; an explicit mode starts a new one
        mode = request.mode or (
            "incremental" if state is not None and state.watermark is not None else "full"
        )
        return await self._storage.start_sync_session(lease, user_id, str(uuid.uuid4()), mode)

    async def _answered(self, fetch: asyncio.Task[ConversationsPage], until: float) -> bool:
        """Wait for a fetch until the clock reads `until`; whether it answered by then."""
        if fetch.done():
            return True
        alarm = asyncio.ensure_future(self._alarm(max(0.0, until - self._clock())))
        try:
            await asyncio.wait({fetch, alarm}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await discard(alarm)
        return fetch.done()

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
        keeper: LeaseKeeper,
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
                if not await self._answered(fetch, deadline + ABANDON_GRACE_SECONDS if first else deadline):
                    self._metrics.graph_requests.labels("abandoned").inc()
                    if first:  # nothing written: the caller learns that Graph hangs
                        raise GraphUnavailable(GRAPH_TOO_SLOW)
                    run.has_more = True  # the next request fetches this page again
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
                if result.paging_problem is not None and not reached:
                    # Going on would skip the rest of the page; calling it complete would hide that.
                    raise GraphUnavailable(result.paging_problem)
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
                await discard(fetch)

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
        log.warning(
            "sync of page %s stopped: %s",
            page.id,
            exc.message,
            extra={"page_id": page.id, "session_id": run.session_id, "synced": run.synced, "code": exc.code},
        )
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
