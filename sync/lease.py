"""A sync's hold on its page's lock: taken, kept alive, and let go on every way out.

    Leases(storage, ttl)
      acquire(page_id)          one atomic statement; 409 sync_in_progress with the holder's expiresAt
      LeaseKeeper               extends the lease every third of its TTL; notices a takeover
      let_go(keeper, lease)     stops the keeper and releases the lock, as a tracked task, so that
                                a cancelled sync still lets go and `wait_released` can wait for it

A sync cancelled while its acquiring statement runs may already own the lock: the lock is
released as soon as that statement returns. ``wait_released`` is what a shutdown awaits so
that no lock outlives the process (SPEC semantics 1: otherwise it stays held for its TTL).

A release that finds the database unavailable (a sync cut off by an outage) is tried again in
the background, backing off, until the lease would have expired anyway: without that, the page
stayed locked for the whole TTL (300 s by default) after a database restart. A late release is
safe: it only matches the lease's own fencing token, so it never frees a lock someone took over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any

from core.errors import DatabaseUnavailable, LeaseLost, SyncInProgress
from storage import Storage
from storage.base import Lease

log = logging.getLogger(__name__)

# A release that found the database unavailable is tried again after this, doubled each time up to
# RELEASE_RETRY_MAX_SECONDS, until the lease would have expired.
RELEASE_RETRY_SECONDS = 0.5
RELEASE_RETRY_MAX_SECONDS = 10.0


async def discard(task: asyncio.Future[Any]) -> None:
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


class LeaseKeeper:
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
        await discard(self._task)


class Leases:
    """Takes and lets go of pages' sync locks for one engine, and knows which releases are under way."""

    def __init__(self, storage: Storage, ttl: float) -> None:
        self._storage = storage
        self._ttl = ttl
        self._instance = f"{socket.gethostname()}:{os.getpid()}"
        self._releasing: set[asyncio.Task[None]] = set()

    async def acquire(self, page_id: str) -> Lease:
        """The page's lock, or SyncInProgress; a cancelled call lets go of a lock it got."""
        acquiring = asyncio.ensure_future(self._acquire(page_id))
        try:
            return await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            # The statement may have committed already: release what it returns.
            self._track(self._release_once_acquired(acquiring))
            raise

    async def _acquire(self, page_id: str) -> Lease:
        locked_by = f"{self._instance}:{uuid.uuid4().hex[:8]}"
        for _ in range(3):  # the holder may let go between our two statements
            lease = await self._storage.acquire_sync_lock(page_id, locked_by, self._ttl)
            if lease is not None:
                return lease
            holder = await self._storage.current_lock(page_id)
            if holder is not None:
                raise SyncInProgress("Sync already in progress", expiresAt=holder.expires_at)
        raise SyncInProgress("Sync already in progress", expiresAt=None)

    def keep(self, lease: Lease) -> LeaseKeeper:
        """Start extending the lease until `let_go`."""
        return LeaseKeeper(self._storage, lease, self._ttl)

    async def let_go(self, keeper: LeaseKeeper, lease: Lease) -> None:
        """Stop the keeper and release the lock; completes even if the caller is cancelled meanwhile."""
        await asyncio.shield(self._track(self._let_go(keeper, lease)))

    def _track(self, release: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(release)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return task

    async def _let_go(self, keeper: LeaseKeeper, lease: Lease) -> None:
        await keeper.stop()
        await self._release(lease)

    async def _release_once_acquired(self, acquiring: asyncio.Future[Lease]) -> None:
        try:
            lease = await acquiring
        except (Exception, asyncio.CancelledError):  # no lock was taken (409, a database error)
            return
        await self._release(lease)

    async def _release(self, lease: Lease) -> None:
        try:
            await self._storage.release_sync_lock(lease)
        except DatabaseUnavailable:
            log.warning(
                "could not release the sync lock of page %s: the database is unavailable; "
                "trying again in the background",
                lease.page_id,
            )
            self._track(self._release_later(lease))
        except Exception:  # it expires on its own; never hide the sync's own outcome
            log.exception("could not release the sync lock of page %s", lease.page_id)

    async def _release_later(self, lease: Lease) -> None:
        """Release `lease` once the database is back, backing off; give up when it would have expired."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ttl
        delay = RELEASE_RETRY_SECONDS
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(delay, left))
            try:
                await self._storage.release_sync_lock(lease)
            except DatabaseUnavailable:
                delay = min(delay * 2, RELEASE_RETRY_MAX_SECONDS)
                continue
            except Exception:
                log.exception("could not release the sync lock of page %s", lease.page_id)
                return
            log.info("released the sync lock of page %s after the database came back", lease.page_id)
            return

    async def wait_released(self, seconds: float) -> bool:
        """Wait (at most `seconds`) for the releases under way; True when none is left."""
        pending = set(self._releasing)
        if pending:
            await asyncio.wait(pending, timeout=seconds)
        return not self._releasing

    async def abandon(self) -> None:
        """Stop the releases still under way (at shutdown, after `wait_released`): their leases expire."""
        for task in list(self._releasing):
            await discard(task)
