"""The scheduler: every page kept complete by the service itself (SPEC semantics 12).

One per process, started and stopped by the lifespan (or by ``python app.py worker``):

    housekeeping(), at start and every housekeeping_seconds, in a task of its own
        storage.cleanup_expired_locks()
        inbox retention: applied/ignored rows older than WEBHOOK_RETENTION_DAYS, in small batches
    run_once(), every poll_seconds, on notify() and whenever a sync ends
        storage.due_pages(...)       oldest due first, up to SYNC_CONCURRENCY running in this process
        for each, as a task:         SyncEngine.sync(user, SyncRequest(page, facebook page)), again
                                     while hasMore (a backfill in budget-sized steps)
            complete                 outcome ok: due again at completed_at + SYNC_INTERVAL_SECONDS
            409 (lock held)          another replica or a manual sync has it: skip, no change
            404                      the page was deleted meanwhile: nothing to do
            graph_auth (190)         outcome token_invalid: waits until the page is registered again
            graph_rate_limited       outcome rate_limited: waits until the pool's regain time
            anything else            outcome error: waits 60 s, 120 s, ... up to the interval

Claiming is the sync's own lease: the scheduler only chooses which pages to try; the engine's
lock decides who syncs (so a manual sync answers 409 while a scheduled one runs, and the other
way round). A replica that crashes mid-backfill leaves an unfinished session whose lease
expires; the page is then due at once for any replica, which continues from the saved cursor.
With SYNC_INTERVAL_SECONDS=0 no sync is started; housekeeping runs all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.errors import (
    GraphAuthError,
    GraphRateLimited,
    LeaseLost,
    NotFound,
    ServiceUnavailable,
    SyncInProgress,
)
from core.settings import Settings
from schema.api import SyncRequest
from storage import Storage
from storage.base import DuePage
from sync.engine import SyncEngine, SyncResult
from sync.pool import RatePool
from sync.status import PENDING_GRACE_MS, PHASES, build_status

log = logging.getLogger(__name__)

DAY_MS = 86_400_000


class AutopilotMetrics:
    """The autopilot's metrics, registered in the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        # Every process reads these from the same database: with several workers
        # (PROMETHEUS_MULTIPROC_DIR), /metrics shows the most recent reading, not their sum.
        self.pages = Gauge(
            "autopilot_pages",
            "Pages by sync phase",
            ["phase"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.lag = Histogram(
            "autopilot_scheduler_lag_seconds",
            "How late due pages start (database clock)",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        self.syncs = Counter("autopilot_syncs", "Scheduled sync steps by outcome", ["outcome"], registry=r)
        self.graph_calls = Counter(
            "graph_pool_calls", "Graph calls through the rate-limit pool by outcome", ["outcome"], registry=r
        )
        self.pool_wait = Histogram(
            "graph_pool_wait_seconds",
            "Waits before Graph calls, by reason",
            ["reason"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.pool_app_usage = Gauge(
            "graph_pool_app_usage_percent",
            "The app's latest X-App-Usage (highest percentage)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.pool_app_rate_cap = Gauge(
            "graph_pool_app_rate_cap",
            "Graph calls a second the pool allows the app",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.housekeeping = Counter(
            "autopilot_housekeeping_removed", "Rows removed by housekeeping", ["what"], registry=r
        )


@dataclass
class HousekeepingReport:
    """What one round of housekeeping removed."""

    expired_locks: int = 0
    webhook_events: int = 0


class Scheduler:
    """Runs the background syncs and the housekeeping of one process (see the module docstring)."""

    def __init__(
        self,
        storage: Storage,
        engine: SyncEngine,
        settings: Settings,
        *,
        pool: RatePool | None = None,
        metrics: AutopilotMetrics | None = None,
        poll_seconds: float = 1.0,
        housekeeping_seconds: float = 300.0,
        gauge_seconds: float = 15.0,
        backoff_base_seconds: float = 60.0,
        pending_grace_seconds: float = PENDING_GRACE_MS / 1000,
        retention_batch: int = 500,
        retention_pause_seconds: float = 0.05,
    ) -> None:
        self.storage = storage
        self.engine = engine
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.housekeeping_seconds = housekeeping_seconds
        self.gauge_seconds = gauge_seconds
        self.concurrency = max(1, settings.sync_concurrency)
        self.interval_ms = int(settings.sync_interval_seconds * 1000)
        self.backoff_base_ms = int(backoff_base_seconds * 1000)
        # "Doubling from a minute up to the interval": never below the first step.
        self.backoff_cap_ms = max(self.backoff_base_ms, self.interval_ms)
        self.grace_ms = int(pending_grace_seconds * 1000)
        self.retention_batch = max(1, retention_batch)
        self.retention_pause_seconds = retention_pause_seconds
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def syncs_enabled(self) -> bool:
        """Whether this scheduler starts syncs at all (SYNC_INTERVAL_SECONDS > 0)."""
        return self.interval_ms > 0

    @property
    def running(self) -> frozenset[str]:
        """Page ids whose scheduled sync runs in this process now."""
        return frozenset(self._running)

    # ---- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start claiming due pages, and housekeeping (at once, then every housekeeping_seconds)."""
        if not self._tasks:
            self._stopping = False
            # Housekeeping has a task of its own: a long retention run never delays a due page.
            self._tasks = [
                asyncio.create_task(self._loop(), name="autopilot-scheduler"),
                asyncio.create_task(self._housekeeping_loop(), name="autopilot-housekeeping"),
            ]

    async def stop(self) -> None:
        """Stop claiming and stop the running syncs (each saves its cursor and lets go of its lock)."""
        self._stopping = True
        self._wake.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        running = list(self._running.values())
        for sync in running:
            sync.cancel()
        if running:
            await asyncio.wait(running, timeout=10)

    def notify(self) -> None:
        """Look for due pages now (e.g. a page was just registered)."""
        self._wake.set()

    async def _loop(self) -> None:
        next_gauges = 0.0
        delay = self.poll_seconds
        while not self._stopping:
            self._wake.clear()  # before the round: a wake-up during it starts the next at once
            try:
                await self.run_once()
                if self.metrics is not None and time.monotonic() >= next_gauges:
                    await self.refresh_gauges()
                    next_gauges = time.monotonic() + self.gauge_seconds
                delay = self.poll_seconds
            except asyncio.CancelledError:
                raise
            except Exception:  # the database is down, say: never a hot loop, never a dead scheduler
                log.exception("scheduler round failed")
                delay = min(max(delay * 2, self.poll_seconds), 30.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _housekeeping_loop(self) -> None:
        while not self._stopping:
            try:
                await self.housekeeping()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("housekeeping failed")
            await asyncio.sleep(self.housekeeping_seconds)

    # ---- claiming --------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Start syncs of due pages, oldest due first, up to the free concurrency; how many started."""
        if not self.syncs_enabled or self._stopping:
            return 0
        free = self.concurrency - len(self._running)
        if free <= 0:
            return 0
        due = await self.storage.due_pages(self.interval_ms, free, self.grace_ms, exclude=list(self._running))
        for page in due:
            if self.metrics is not None:
                self.metrics.lag.observe(max(0, page.db_now - page.due_at) / 1000)
            task = asyncio.create_task(self._run_page(page), name=f"autopilot-sync-{page.page_id}")
            self._running[page.page_id] = task
            task.add_done_callback(functools.partial(self._finished, page.page_id))
        return len(due)

    def _finished(self, page_id: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(page_id, None)
        self._wake.set()  # a slot is free

    async def run_until_idle(self, within: float) -> None:
        """Run rounds until nothing is due and nothing runs (for tests and one-shot commands).

        Raises TimeoutError naming the pages still running when `within` seconds pass.
        """
        deadline = time.monotonic() + within
        while True:
            started = await self.run_once()
            if not self._running and started == 0:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"scheduler still busy after {within}s: running {sorted(self._running)}")
            if self._running:
                await asyncio.wait(list(self._running.values()), timeout=min(left, self.poll_seconds))

    # ---- one page ----------------------------------------------------------------------------------

    async def _run_page(self, due: DuePage) -> None:
        request = SyncRequest(page_id=due.page_id, facebook_page_id=due.facebook_page_id)
        while True:
            outcome = await self._step(due, request)
            if outcome is None or not outcome.has_more:
                return
            if self._stopping:
                return  # the unfinished session is due at once, for any replica

    async def _step(self, due: DuePage, request: SyncRequest) -> SyncResult | None:
        """One sync call and what it means for the schedule; None when the page is done for now."""
        page_id = due.page_id
        try:
            outcome = await self.engine.sync(due.user_id, request)
        except (SyncInProgress, LeaseLost):
            self._count("skipped")  # another replica or a manual sync holds (or took) the page
            return None
        except NotFound:
            self._count("gone")
            return None
        except GraphAuthError as exc:
            self._count("token_invalid")
            await self._quietly(self.storage.set_schedule(page_id, "token_invalid", last_error=exc.message))
            return None
        except GraphRateLimited as exc:
            self._count("rate_limited")
            await self._quietly(self._rate_limited(due, exc))
            return None
        except ServiceUnavailable:
            if self._stopping:
                return None  # the engine is shutting down with us
            self._count("error")
            await self._quietly(self._failed(page_id, "service unavailable"))
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._count("error")
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            code = getattr(exc, "code", None)
            log.warning("scheduled sync of page %s failed: %s", page_id, message)
            await self._quietly(self._failed(page_id, f"{code}: {message}" if code else message))
            return None
        self._count("partial" if outcome.has_more else "complete")
        if not outcome.has_more:
            await self._quietly(self.storage.set_schedule(page_id, "ok"))
        return outcome

    async def _rate_limited(self, due: DuePage, exc: GraphRateLimited) -> None:
        retry = exc.extra.get("retryAfter", exc.extra.get("retry_after"))
        hold = await self.pool.held_until(due.facebook_page_id) if self.pool is not None else None
        await self.storage.set_schedule(
            due.page_id,
            "rate_limited",
            not_before=hold,
            delay_ms=None if retry is None else int(float(retry) * 1000),
            last_error=f"{exc.code}: {exc.message}",
            reset_failures=False,
        )

    async def _failed(self, page_id: str, error: str) -> None:
        entry = await self.storage.record_sync_failure(
            page_id, error, self.backoff_base_ms, self.backoff_cap_ms
        )
        if entry is not None:
            log.info(
                "page %s backs off after %d failure(s), until %s", page_id, entry.failures, entry.not_before
            )

    async def _quietly(self, write: Any) -> None:
        """A schedule write that fails is logged: the derived due time still holds the page."""
        try:
            await write
        except Exception:
            log.warning("could not record a scheduled sync's outcome", exc_info=True)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.syncs.labels(outcome).inc()

    # ---- housekeeping --------------------------------------------------------------------------------

    async def housekeeping(self) -> HousekeepingReport:
        """Remove expired locks and apply inbox retention (harmless on several replicas at once)."""
        report = HousekeepingReport()
        report.expired_locks = await self.storage.cleanup_expired_locks()
        days = self.settings.webhook_retention_days
        if days > 0:
            max_age_ms = int(days * DAY_MS)
            while not self._stopping:
                deleted = await self.storage.delete_expired_webhook_events(max_age_ms, self.retention_batch)
                report.webhook_events += deleted
                if deleted < self.retention_batch:
                    break
                # Small batches with a pause between: the webhook's inserts never wait long.
                await asyncio.sleep(self.retention_pause_seconds)
        if self.metrics is not None:
            self.metrics.housekeeping.labels("expired_locks").inc(report.expired_locks)
            self.metrics.housekeeping.labels("webhook_events").inc(report.webhook_events)
        if report.expired_locks or report.webhook_events:
            log.info(
                "housekeeping: %d expired lock(s), %d old inbox row(s) removed",
                report.expired_locks,
                report.webhook_events,
            )
        return report

    async def refresh_gauges(self) -> None:
        """Count every page by phase (the autopilot_pages gauge)."""
        facts = await self.storage.page_sync_facts(
            None, None, self.interval_ms, self.grace_ms, count_conversations=False
        )
        counts = dict.fromkeys(PHASES, 0)
        for fact in facts:
            counts[build_status(fact, scheduler_enabled=self.syncs_enabled).phase] += 1
        if self.metrics is not None:
            for phase, n in counts.items():
                self.metrics.pages.labels(phase).set(n)
