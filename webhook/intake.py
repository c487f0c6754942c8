"""Webhook intake: raw bodies made durable in the inbox by group commit.

Many requests arrive at once; committing each in its own transaction would cost one
fsync (SQLite) or one WAL flush (PostgreSQL) per request. Instead, one writer task
gathers what the requests hand it and commits them together:

    request ──submit(body)──▶ queue ──▶ writer: take what is queued (≤ webhook_batch_max),
       ▲                                 wait ≤ webhook_batch_wait_seconds for more only
       │                                 while requests keep coming, then ONE transaction
       └──── future resolved ◀───────── (storage.record_webhook_batch), then on_commit()

A request answers 200 only after its future resolved, i.e. after its batch committed; a
failed commit fails every future in the batch with ``DatabaseUnavailable`` (the route answers
503 ``database_unavailable`` so Meta retries). Bodies are stored as they came, unread: the
applier reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from core.errors import DatabaseUnavailable, ServiceUnavailable
from core.metrics import Metrics
from core.settings import Settings
from storage import Storage
from storage.base import InboxBody

log = logging.getLogger(__name__)

# A batch also stops growing past this many bytes of bodies (one statement stays sane).
MAX_BATCH_BYTES = 16 * 1024 * 1024
# Commits in flight at once (each a batch of bodies).
MAX_INFLIGHT = 4
# A commit gathering at least this many bodies means requests are queueing: the intake is
# saturated, and the applier yields the CPU to it for a while (see applier.py).
SATURATED_BATCH = 8
# How long one saturated commit keeps the intake counted as saturated.
SATURATED_WINDOW_SECONDS = 0.2

_Item = tuple[InboxBody, "asyncio.Future[None]"]


class InboxWriter:
    """Group commit of webhook bodies into the inbox (one writer task per app)."""

    def __init__(
        self,
        storage: Storage,
        settings: Settings,
        metrics: Metrics,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.storage = storage
        self.metrics = metrics
        self.batch_max = max(1, settings.webhook_batch_max)
        self.batch_wait = max(0.0, settings.webhook_batch_wait_seconds)
        self.on_commit = on_commit
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._arrived = asyncio.Event()  # set by submit(): wakes a writer waiting for more
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._saturated_at = -1e9

    def saturated(self) -> bool:
        """Whether requests were queueing behind recent commits (a burst is being absorbed)."""
        return time.monotonic() - self._saturated_at < SATURATED_WINDOW_SECONDS

    async def start(self) -> None:
        """Start the writer task."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="inbox-writer")

    async def stop(self) -> None:
        """Refuse new bodies, commit the ones already queued, end the writer task."""
        self._closing = True
        task, self._task = self._task, None
        if task is None:
            return
        self._queue.put_nowait(_STOP)
        self._arrived.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_queued(ServiceUnavailable("Webhook intake stopped"))

    async def submit(self, body: InboxBody) -> None:
        """Return once `body` is committed to the inbox; raise if its batch failed."""
        if self._closing or self._task is None:
            raise ServiceUnavailable("Webhook intake is not running")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((body, future))
        self._arrived.set()
        await future

    # ---- the writer -----------------------------------------------------------------------

    async def _run(self) -> None:
        # Up to MAX_INFLIGHT commits at once: while one waits for the database (a WAL flush
        # on PostgreSQL), the next batch gathers and starts. SQLite's commits are serial anyway.
        slots = asyncio.Semaphore(MAX_INFLIGHT)
        inflight: set[asyncio.Task[None]] = set()

        async def commit(batch: list[_Item]) -> None:
            try:
                await self._commit(batch)
            finally:
                slots.release()

        try:
            while True:
                first = await self._queue.get()
                if first is _STOP:
                    return
                await slots.acquire()  # before gathering: what queues meanwhile joins this batch
                batch, stop = await self._gather(first)
                task = asyncio.create_task(commit(batch))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                if stop:
                    return
        finally:
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    async def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """`first` and what follows it, bounded in count, bytes and waiting time."""
        batch = [first]
        size = len(first[0].body)
        deadline = time.monotonic() + self.batch_wait
        queue = self._queue
        yielded = False
        while len(batch) < self.batch_max and size < MAX_BATCH_BYTES:
            if queue.empty():
                if not yielded:
                    # Let requests the loop is already handling reach the queue; on an
                    # idle queue that brings nothing, and the batch goes without sleeping.
                    yielded = True
                    await asyncio.sleep(0)
                    if queue.empty():
                        break
                    continue
                # Requests are streaming in: wait a little for more, up to the deadline.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
                continue
            item = queue.get_nowait()
            if item is _STOP:
                return batch, True
            batch.append(item)
            size += len(item[0].body)
        return batch, False

    async def _commit(self, batch: list[_Item]) -> None:
        # Two requests with the same body share one row; ON CONFLICT covers other batches.
        unique = list({item[0].body_sha256: item[0] for item in batch}.values())
        try:
            await self.storage.record_webhook_batch(unique)
        except Exception as exc:  # the database is down or refused: every request gets 503
            log.warning("inbox commit of %d bodies failed: %s", len(unique), exc)
            error = DatabaseUnavailable("Webhook inbox unavailable; retry later")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.metrics.webhook_batch_size.observe(len(unique))
        if len(batch) >= SATURATED_BATCH:
            self._saturated_at = time.monotonic()
        for _, future in batch:
            if not future.done():  # a request whose client went away was cancelled
                future.set_result(None)
        if self.on_commit is not None:
            self.on_commit()

    def _fail_queued(self, error: Exception) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not _STOP and not item[1].done():
                item[1].set_exception(error)


# Queued by stop(): the writer commits what precedes it, then ends.
_STOP: _Item = (InboxBody(body=b"", body_sha256=""), None)  # type: ignore[assignment]
