"""Leases on both engines: a release that meets a database outage is tried again, not left for the TTL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.errors import DatabaseUnavailable
from storage import Storage
from storage.base import Lease
from sync import lease as lease_module
from sync.lease import Leases


class FlakyRelease:
    """A Storage whose first `failures` releases find the database unavailable."""

    def __init__(self, storage: Storage, failures: int) -> None:
        self._storage = storage
        self.failures = failures
        self.attempts = 0

    async def release_sync_lock(self, lease: Lease) -> bool:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise DatabaseUnavailable("The database is unavailable; retry later")
        return await self._storage.release_sync_lock(lease)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_module, "RELEASE_RETRY_SECONDS", 0.01)
    monkeypatch.setattr(lease_module, "RELEASE_RETRY_MAX_SECONDS", 0.02)


async def registered(storage: Storage) -> str:
    page, _ = await storage.register_page("alice", "104325188712345", "EAAB-token", "Acme")
    return page.id


async def test_a_release_during_an_outage_is_retried_until_the_database_is_back(storage: Storage) -> None:
    page_id = await registered(storage)
    flaky = FlakyRelease(storage, failures=3)
    leases = Leases(flaky, ttl=30)  # type: ignore[arg-type]
    lease = await leases.acquire(page_id)
    keeper = leases.keep(lease)
    await leases.let_go(keeper, lease)  # returns after the first attempt: the sync's answer is not held up
    assert await storage.current_lock(page_id) is not None
    assert await leases.wait_released(5)
    assert flaky.attempts == 4
    assert await storage.current_lock(page_id) is None  # free now, not in 30 s


async def test_retries_stop_when_the_lease_would_have_expired(storage: Storage) -> None:
    page_id = await registered(storage)
    flaky = FlakyRelease(storage, failures=10**9)
    leases = Leases(flaky, ttl=0.2)  # type: ignore[arg-type]
    lease = await leases.acquire(page_id)
    await leases.let_go(leases.keep(lease), lease)
    assert await leases.wait_released(5)  # gave up: the lease expires on its own
    assert 1 < flaky.attempts < 100


async def test_a_late_release_never_frees_a_lock_taken_over_meanwhile(storage: Storage) -> None:
    page_id = await registered(storage)
    flaky = FlakyRelease(storage, failures=1)
    leases = Leases(flaky, ttl=0.3)  # type: ignore[arg-type]
    lease = await leases.acquire(page_id)
    flaky.failures = 10**9  # the database stays away until the lease has expired
    await leases.let_go(leases.keep(lease), lease)
    await asyncio.sleep(0.4)
    taken = await storage.acquire_sync_lock(page_id, "next-process", 30)
    assert taken is not None and taken.fencing_token > lease.fencing_token
    flaky.failures = 0  # back: a late release of the old lease must not free the new one
    assert await storage.release_sync_lock(lease) is False
    assert await leases.wait_released(5)
    holder = await storage.current_lock(page_id)
    assert holder is not None and holder.locked_by == "next-process"


async def test_abandon_stops_the_retries_at_shutdown(storage: Storage) -> None:
    page_id = await registered(storage)
    flaky = FlakyRelease(storage, failures=10**9)
    leases = Leases(flaky, ttl=30)  # type: ignore[arg-type]
    lease = await leases.acquire(page_id)
    await leases.let_go(leases.keep(lease), lease)
    assert not await leases.wait_released(0.05)
    await leases.abandon()
    assert await leases.wait_released(0)
