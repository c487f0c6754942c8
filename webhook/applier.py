"""The webhook applier: pending inbox rows become conversations and events.

One background task per replica. It wakes when rows are committed to the inbox (storage's
``subscribe_inbox()``: this replica's commits, and on PostgreSQL with a direct connection every
replica's, by LISTEN/NOTIFY; ``notify()`` too) and every ``applier_poll_seconds`` (so rows
another replica received, or that were pending at a crash, are picked up without a
notification), then drains the inbox in batches:

    webhook.apply.apply_batch(storage, parse, applier_batch_size)   one transaction per batch:
        claim pending rows (SKIP LOCKED on PostgreSQL) -> parse -> write -> mark rows
        (run again by storage on a transient failure: a deadlock, a serialization failure)
    a batch that raises -> its rows again one by one; a row that fails alone is marked
        'failed' with the error (``python app.py replay-webhooks`` retries it)

Reading happens here, not in the request (the webhook acknowledges every signed body once
stored). Reading errors are not failures: a body that does not parse or is not shaped like a
webhook body is marked ``invalid`` with msgspec's reason and JSON path; an item that cannot be
read is skipped and recorded in the row's ``error`` while the rest is applied. Statuses:

    applied   the body is for a registered page: its readable items written (possibly none,
              when all are of kinds not stored); skipped items, if any, listed in ``error``
    ignored   no registered page (a page nobody registered, another object, a dashboard ping)
    invalid   the body itself is unreadable (``error`` says why and where)
    failed    the write raised, alone (``error``)

Counted in /metrics: rows by status (``webhook_inbox_rows``), items of an unknown kind
(``webhook_unknown_items``), items skipped (``webhook_skipped_items``). ``replay-webhooks``
applies failed and invalid rows again, and applied rows that skipped items.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from core.errors import ServiceUnavailable
from core.metrics import Metrics
from core.settings import Settings
from storage import Storage
from storage.base import WriteCounts
from webhook.apply import ApplyReport, ParsedInboxBody, apply_batch
from webhook.parse import InvalidWebhook, read_webhook

log = logging.getLogger(__name__)

# After an error that is not one row's fault (database down), wait this long at first.
ERROR_BACKOFF_SECONDS = 0.5
# Refresh the pending-rows gauge at most this often (it costs a count).
PENDING_GAUGE_SECONDS = 5.0
# While the intake is saturated, look again this often whether it still is.
YIELD_CHECK_SECONDS = 0.05
# A row's error (and its log line) names at most this many skipped items (a body may hold thousands).
MAX_REASONS = 20
# Statuses `replay-webhooks` sets back to pending (with applied rows that skipped items).
REPLAY_STATUSES = ("failed", "invalid")


@dataclass
class DrainSummary:
    """What a drain did: inbox rows by outcome, and the rows written."""

    batches: int = 0
    claimed: int = 0
    applied: int = 0
    ignored: int = 0
    invalid: int = 0
    failed: int = 0
    unknown_items: int = 0
    skipped_items: int = 0
    counts: WriteCounts = field(default_factory=WriteCounts)

    def add(self, report: ApplyReport) -> None:
        """Accumulate one committed batch."""
        self.batches += 1
        self.claimed += report.claimed
        self.applied += report.applied
        self.ignored += report.ignored
        self.invalid += report.invalid
        self.counts.add(report.counts)


class _Parser:
    """The parse function for one batch; counts items (kept only if the batch commits).

    Counted per body, so a batch that storage runs again (a transient failure) counts once.
    """

    def __init__(self) -> None:
        self._counts: dict[bytes, tuple[int, int]] = {}

    @property
    def unknown(self) -> int:
        """Items of a kind not stored, in the bodies read."""
        return sum(unknown for unknown, _ in self._counts.values())

    @property
    def skipped(self) -> int:
        """Items that could not be read (and were skipped), in the bodies read."""
        return sum(skipped for _, skipped in self._counts.values())

    def __call__(self, body: bytes) -> ParsedInboxBody:
        try:
            parsed = read_webhook(body)
        except InvalidWebhook as exc:
            log.warning("webhook body %s is invalid: %s", _digest(body), exc)
            raise
        except Exception as exc:  # a defect of ours: the row stays replayable once it is fixed
            log.exception("webhook body %s could not be read", _digest(body))
            raise InvalidWebhook(f"Unreadable webhook body ({type(exc).__name__}: {exc})") from exc
        self._counts[body] = (parsed.unknown, len(parsed.skipped))
        error = None
        if parsed.skipped:
            reasons = parsed.skipped[:MAX_REASONS] + (["..."] if len(parsed.skipped) > MAX_REASONS else [])
            error = f"{len(parsed.skipped)} item(s) skipped: " + "; ".join(reasons)
            log.warning("webhook body %s: %s", _digest(body), error)
        return ParsedInboxBody(items=parsed.items, pages=parsed.pages, unsent=parsed.unsent, error=error)


def _digest(body: bytes) -> str:
    """A short name for a body in the log (its row's body_sha256 starts so), never its content."""
    return hashlib.sha256(body).hexdigest()[:12]


class Applier:
    """Applies pending inbox rows in the background; ``drain()`` does it on demand."""

    def __init__(
        self,
        storage: Storage,
        settings: Settings,
        metrics: Metrics,
        intake_saturated: Callable[[], bool] | None = None,
    ) -> None:
        self.storage = storage
        self.metrics = metrics
        self.batch_size = max(1, settings.applier_batch_size)
        self.poll_seconds = settings.applier_poll_seconds
        self.max_yield_seconds = settings.applier_max_yield_seconds
        # Acks come first: while a burst saturates this replica's intake, the background
        # applier steps aside (the inbox holds the rows durably) for at most max_yield_seconds
        # in a row, then applies regardless. Under normal load it never yields.
        self.intake_saturated = intake_saturated
        self._yield_started: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._gauge_at = 0.0

    async def start(self) -> None:
        """Start the background task; it drains what is pending at once."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="webhook-applier")

    async def stop(self) -> None:
        """Let the current batch finish (briefly), then end the task; pending rows stay pending."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=5)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def notify(self) -> None:
        """New rows were committed to the inbox: wake up (cheap; called after every commit)."""
        self._wake.set()

    async def drain(self) -> DrainSummary:
        """Apply batches until nothing is pending (for this replica); returns what was done."""
        return await self._drain(background=False)

    async def _drain(self, background: bool) -> DrainSummary:
        summary = DrainSummary()
        while True:
            if background:
                if self._stopping:
                    break
                await self._yield_to_intake()
                await self._refresh_gauge()
            if await self._apply_once(summary) == 0:
                break
        return summary

    # ---- internals ------------------------------------------------------------------------

    async def _yield_to_intake(self) -> None:
        """Wait while the intake is saturated, up to max_yield_seconds in a row."""
        if self.intake_saturated is None:
            return
        while self.intake_saturated() and not self._stopping:
            now = time.monotonic()
            if self._yield_started is None:
                self._yield_started = now
            elif now - self._yield_started >= self.max_yield_seconds:
                return  # overloaded for long: apply anyway (acks slow down, lag stays bounded)
            await asyncio.sleep(YIELD_CHECK_SECONDS)
        self._yield_started = None

    async def _run(self) -> None:
        with self.storage.subscribe_inbox() as committed:
            forward = asyncio.create_task(self._forward(committed.wait), name="webhook-applier-wake")
            try:
                await self._loop()
            finally:
                forward.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await forward

    async def _forward(self, committed: Callable[[float], Awaitable[bool]]) -> None:
        """Turn storage's inbox wake-ups (any replica's commits) into this applier's wake-up."""
        while True:
            if await committed(3600.0):
                self._wake.set()

    async def _loop(self) -> None:
        backoff = ERROR_BACKOFF_SECONDS
        while not self._stopping:
            # Cleared before draining: a commit that lands during the drain wakes us again.
            self._wake.clear()
            try:
                await self._drain(background=True)
                backoff = ERROR_BACKOFF_SECONDS
                timeout = self.poll_seconds
            except Exception:  # the database went away: keep the task alive, retry later
                log.exception("webhook applier pass failed; retrying in %.1fs", backoff)
                timeout, backoff = backoff, min(backoff * 2, 30.0)
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _apply_once(self, summary: DrainSummary) -> int:
        """One batch; on an error, its rows one by one. Returns how many rows were handled."""
        parser = _Parser()
        try:
            report = await apply_batch(self.storage, parser, self.batch_size)
        except Exception as exc:
            log.warning("webhook batch failed (%s); applying its rows one by one", exc)
            ids = await self.storage.pending_webhook_ids(self.batch_size)
            for inbox_id in ids:
                await self._apply_row(inbox_id, summary)
            return len(ids)
        self._record(report, parser, summary)
        return report.claimed

    async def _apply_row(self, inbox_id: int, summary: DrainSummary) -> None:
        """One row alone, so a poison row cannot hold back the rest: 'failed' if it raises.

        Storage already ran it again if its failure was transient; what still raises is the row's.
        """
        parser = _Parser()
        try:
            report = await apply_batch(self.storage, parser, 1, ids=[inbox_id])
        except ServiceUnavailable:  # the database's failure, not the row's: it stays pending
            raise
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
        else:
            self._record(report, parser, summary)
            return
        log.error("webhook inbox row %d failed: %s", inbox_id, message)
        await self.storage.mark_webhook_failed([inbox_id], message)
        summary.failed += 1
        self.metrics.webhook_applied.labels("failed").inc()

    def _record(self, report: ApplyReport, parser: _Parser, summary: DrainSummary) -> None:
        if report.claimed == 0:
            return
        summary.add(report)
        summary.unknown_items += parser.unknown
        summary.skipped_items += parser.skipped
        if parser.unknown:
            self.metrics.webhook_unknown_items.inc(parser.unknown)
        if parser.skipped:
            self.metrics.webhook_skipped_items.inc(parser.skipped)
        applied = self.metrics.webhook_applied
        for status in ("applied", "ignored", "invalid"):
            n = getattr(report, status)
            if n:
                applied.labels(status).inc(n)
        now_ms = time.time() * 1000
        lag = self.metrics.webhook_apply_lag
        for received in report.received_at:
            lag.observe(max(0.0, (now_ms - received) / 1000))

    async def _refresh_gauge(self) -> None:
        now = time.monotonic()
        if now - self._gauge_at >= PENDING_GAUGE_SECONDS:  # a count on every batch would cost
            self._gauge_at = now
            self.metrics.webhook_pending.set(await self.storage.pending_webhook_count())


async def run_replay_command(settings: Settings) -> int:
    """``python app.py replay-webhooks``: failed, invalid and item-skipping rows again, then drain.

    Failed and invalid rows, and applied rows that recorded skipped items, go back to pending
    (applying is idempotent: what was written stays once), and the inbox is drained. Prints
    what happened; exits 1 if some rows failed again, else 0 (rows still invalid after a
    replay wait for the next one: the body is kept).
    """
    from core.services import opened_storage

    async with opened_storage(settings) as storage:
        return await replay_webhooks(storage, settings)


async def replay_webhooks(storage: Storage, settings: Settings) -> int:
    """The replay on an opened, migrated storage (core/cli.py); prints and returns as above."""
    requeued = await storage.requeue_webhooks(list(REPLAY_STATUSES), with_skipped_items=True)
    summary = await Applier(storage, settings, Metrics()).drain()
    counts = await storage.webhook_status_counts()
    print(f"requeued: {requeued}")
    print(
        f"applied: {summary.applied}, ignored: {summary.ignored}, invalid: {summary.invalid}, "
        f"failed: {summary.failed}, events inserted: {summary.counts.events_inserted}, "
        f"items skipped: {summary.skipped_items}"
    )
    print("inbox: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "empty"))
    return 1 if summary.failed else 0
