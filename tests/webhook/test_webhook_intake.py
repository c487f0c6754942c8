"""The inbox writer: group commit, bounds, failures, shutdown."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from core.errors import DatabaseUnavailable, ServiceUnavailable
from core.metrics import Metrics
from storage import Storage
from storage.base import InboxBody
from tests.helpers import make_settings
from webhook.intake import InboxWriter


def body(i: int) -> InboxBody:
    raw = b'{"object":"page","entry":[],"n":%d}' % i
    return InboxBody(body=raw, body_sha256=hashlib.sha256(raw).hexdigest())


class CountingStorage:
    """The real storage, with its batch commits counted (and optionally broken)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.batches: list[int] = []
        self.broken = False

    async def record_webhook_batch(self, bodies: Any) -> None:
        self.batches.append(len(bodies))
        if self.broken:
            raise ConnectionRefusedError("database down")
        await self.inner.record_webhook_batch(bodies)


def writer(storage: Storage, db_url: str, **overrides: Any) -> tuple[InboxWriter, CountingStorage, list[int]]:
    counting = CountingStorage(storage)
    commits: list[int] = []
    inbox = InboxWriter(
        counting,  # type: ignore[arg-type]
        make_settings(db_url, **overrides),
        Metrics(),
        on_commit=lambda: commits.append(len(counting.batches)),
    )
    return inbox, counting, commits


async def test_concurrent_submits_share_transactions(storage: Storage, db_url: str) -> None:
    inbox, counting, commits = writer(storage, db_url)
    await inbox.start()
    try:
        await asyncio.gather(*(inbox.submit(body(i)) for i in range(50)))
    finally:
        await inbox.stop()
    assert await storage.webhook_status_counts() == {"pending": 50}
    assert sum(counting.batches) == 50
    assert len(counting.batches) < 50  # grouped, not one transaction per request
    assert commits == list(range(1, len(counting.batches) + 1))  # on_commit after each commit


async def test_batches_are_bounded(storage: Storage, db_url: str) -> None:
    inbox, counting, _ = writer(storage, db_url, webhook_batch_max=4)
    await inbox.start()
    try:
        await asyncio.gather(*(inbox.submit(body(i)) for i in range(10)))
    finally:
        await inbox.stop()
    assert max(counting.batches) <= 4
    assert sum(counting.batches) == 10
    assert await storage.webhook_status_counts() == {"pending": 10}


async def test_identical_bodies_in_one_batch_are_one_row(storage: Storage, db_url: str) -> None:
    inbox, counting, _ = writer(storage, db_url)
    await inbox.start()
    try:
        await asyncio.gather(*(inbox.submit(body(7)) for _ in range(5)))
        await inbox.submit(body(7))  # and again in a later batch
    finally:
        await inbox.stop()
    assert await storage.webhook_status_counts() == {"pending": 1}


async def test_idle_queue_does_not_wait_for_company(storage: Storage, db_url: str) -> None:
    # A batch wait of an hour: a lone request must still commit at once.
    inbox, counting, _ = writer(storage, db_url, webhook_batch_wait_seconds=3600.0)
    await inbox.start()
    try:
        await asyncio.wait_for(inbox.submit(body(1)), timeout=30)
        await asyncio.wait_for(inbox.submit(body(2)), timeout=30)
    finally:
        await inbox.stop()
    assert counting.batches == [1, 1]


async def test_failed_commit_fails_every_request_of_the_batch(storage: Storage, db_url: str) -> None:
    inbox, counting, commits = writer(storage, db_url)
    await inbox.start()
    try:
        counting.broken = True
        results = await asyncio.gather(*(inbox.submit(body(i)) for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, DatabaseUnavailable) for r in results)  # 503 database_unavailable
        assert commits == []  # nothing committed, nothing to apply
        counting.broken = False
        await inbox.submit(body(99))  # the writer survived
    finally:
        await inbox.stop()
    assert await storage.webhook_status_counts() == {"pending": 1}


async def test_stop_commits_what_is_queued_then_refuses(storage: Storage, db_url: str) -> None:
    inbox, _, _ = writer(storage, db_url)
    await inbox.start()
    tasks = [asyncio.create_task(inbox.submit(body(i))) for i in range(8)]
    await asyncio.sleep(0)  # queued, not yet committed
    await inbox.stop()
    await asyncio.gather(*tasks)
    assert await storage.webhook_status_counts() == {"pending": 8}
    with pytest.raises(ServiceUnavailable):
        await inbox.submit(body(100))


async def test_invalid_bodies_keep_status_and_error(storage: Storage, db_url: str) -> None:
    inbox, _, _ = writer(storage, db_url)
    raw = b'{"object": 1}'
    await inbox.start()
    try:
        await inbox.submit(
            InboxBody(body=raw, body_sha256=hashlib.sha256(raw).hexdigest(), status="invalid", error="bad")
        )
    finally:
        await inbox.stop()
    assert await storage.webhook_status_counts() == {"invalid": 1}
