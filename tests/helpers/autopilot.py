"""Helpers for the autopilot tests: storage with the autopilot half, scheduler instances wired as
the service wires them (real storage, SyncEngine, GraphClient, PooledTransport) over an
httpx.ASGITransport to the Graph stand-in behind its limits, and bounded waits.

``python -m tests.helpers.autopilot crash-worker DB_URL`` runs one scheduler in a process of its
own, against its own stand-in whose answers are slowed down, until it is killed (the crash test).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.standin_limits import PagesStandin, StandinLimits, bench_page_ids
from core.metrics import Metrics
from core.settings import Settings
from storage import open_storage
from storage.autopilot import AutopilotStorage
from storage.base import Page
from storage.sql import SQLStorage
from sync.engine import SyncEngine
from sync.graph_client import GraphClient
from sync.pool import PooledTransport, PoolPolicy, RatePool
from sync.scheduler import AutopilotMetrics, Scheduler
from tests.helpers import GRAPH_URL, make_settings
from webhook.parse import read_webhook


class Store(SQLStorage, AutopilotStorage):
    """SQLStorage with the autopilot half (the lead adds AutopilotStorage to SQLStorage's bases;
    this order stays valid once it is there)."""


async def open_store(url: str) -> Store:
    """A migrated Store on the database at url."""
    opened = await open_storage(url)
    store = Store(opened.engine)  # type: ignore[attr-defined]
    await store.migrate()
    return store


def contacts_of(body: bytes) -> list[tuple[str, str]]:
    """(facebook page id, contact) of every item of an inbox body that names a contact."""
    parsed = read_webhook(body)
    return [(fb, record.sender_id) for fb, record in parsed.items] + [(fb, c) for fb, c, _ in parsed.unsent]


def autopilot_settings(db_url: str, **overrides: Any) -> Settings:
    """Settings for scheduler tests: small pages (several Graph calls each), no interval reruns."""
    values: dict[str, Any] = {
        "sync_interval_seconds": 3600.0,
        "sync_concurrency": 8,
        "graph_page_calls_per_second": 1000.0,
        "sync_page_size": 2,
        "sync_lock_ttl_seconds": 30.0,
        "sync_time_budget_seconds": 30.0,
        "run_applier": False,
    }
    values.update(overrides)
    return make_settings(db_url, **values)


def limited_standin(
    conversations: int,
    *,
    page_calls_per_second: int = 1000,
    app_calls_per_second: int = 10_000,
    latency_ms: float = 0,
) -> StandinLimits:
    """The stand-in for any page id, behind its limits (high unless the pool is the subject)."""
    return StandinLimits(
        PagesStandin(conversations, latency_ms=latency_ms),
        page_calls_per_second=page_calls_per_second,
        app_calls_per_second=app_calls_per_second,
    )


@dataclass
class Instance:
    """One "replica": its own storage connections, pool, Graph client, engine and scheduler."""

    storage: Store
    pool: RatePool
    engine: SyncEngine
    scheduler: Scheduler
    metrics: AutopilotMetrics


@contextlib.asynccontextmanager
async def instance(
    db_url: str, standin: Any, settings: Settings, **scheduler_options: Any
) -> AsyncIterator[Instance]:
    """A replica wired as the service wires it; its scheduler is not started (tests drive it)."""
    storage = await open_store(db_url)
    metrics = Metrics()
    autopilot = AutopilotMetrics(metrics.registry)
    pool = RatePool(storage, PoolPolicy.from_settings(settings), metrics=autopilot)
    transport = PooledTransport(httpx.ASGITransport(app=standin), pool)
    options: dict[str, Any] = {"poll_seconds": 0.05, "backoff_base_seconds": 60.0}
    options.update(scheduler_options)
    try:
        async with httpx.AsyncClient(base_url=GRAPH_URL, transport=transport) as http:
            # The pool paces the app across replicas: the client's own pacing would pace twice.
            graph = GraphClient(http, pacing_max_delay=0.0)
            engine = SyncEngine(storage, graph, settings, metrics)
            scheduler = Scheduler(storage, engine, settings, pool=pool, metrics=autopilot, **options)
            try:
                yield Instance(storage, pool, engine, scheduler, autopilot)
            finally:
                await scheduler.stop()
                await engine.aclose()
    finally:
        await storage.close()


async def register_pages(storage: Store, count: int, user: str = "alice") -> list[Page]:
    """Register `count` pages (the stand-in's bench page ids) for a user, as POST /api/pages stores them."""
    pages = []
    for fb in bench_page_ids(count):
        page, _ = await storage.register_page(user, fb, f"EAAB-{user}-{fb}", f"Page {fb}")
        pages.append(page)
    return pages


async def wait_until(
    condition: Callable[[], Awaitable[bool]], within: float, message: Callable[[], Awaitable[str]] | str
) -> None:
    """Poll `condition` until it holds; after `within` seconds fail with `message`."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            text = message if isinstance(message, str) else await message()
            raise AssertionError(f"not within {within}s: {text}")
        await asyncio.sleep(0.05)


async def sync_rows(storage: Store, page_ids: Sequence[str]) -> dict[str, Any]:
    """{page_id: sync_state row} of the given pages."""
    async with storage.engine.reader() as conn:
        cond, args = conn.any_of(1, list(page_ids), "text")
        rows = await conn.fetch(f"SELECT * FROM sync_state WHERE page_id {cond}", *args)
    return {r["page_id"]: r for r in rows}


async def conversation_counts(storage: Store) -> dict[str, int]:
    """{page_id: conversations stored}."""
    async with storage.engine.reader() as conn:
        rows = await conn.fetch("SELECT page_id, count(*) AS n FROM messenger_conversations GROUP BY page_id")
    return {r["page_id"]: int(r["n"]) for r in rows}


async def _crash_worker(db_url: str) -> None:
    """Run a scheduler until killed, against a stand-in slowed down so the kill lands mid-backfill."""
    settings = autopilot_settings(db_url, sync_lock_ttl_seconds=2.0, sync_concurrency=1)
    standin = limited_standin(40, latency_ms=150)
    async with instance(db_url, standin, settings) as worker:
        await worker.scheduler.start()
        print("started", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["crash-worker"]:
        asyncio.run(_crash_worker(sys.argv[2]))
