"""`python app.py sync PAGE_ID`: the API's sync from a terminal, resumed until done.

It runs on the storage core/cli.py opened (and migrated) for it, with its own Graph client through
the rate-limit pool (the quota is shared with the service), runs `SyncEngine.sync` again while it
answers `has_more`, and shows a progress line on stderr.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Literal, cast

import httpx

from core.errors import GraphAuthError, ServiceError, SyncInProgress
from core.metrics import Metrics
from core.settings import Settings
from schema.api import SyncRequest
from storage import Storage
from storage.base import Page
from sync.engine import SyncEngine
from sync.graph_client import GRAPH_TIMEOUT, GraphClient
from sync.pool import PooledTransport, PoolPolicy, RatePool


class _ProgressLine:
    """`synced N conversations (R/s)` on stderr: rewritten in place on a terminal, else every few seconds."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._shown = 0.0
        self._tty = sys.stderr.isatty()

    def show(self, synced: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._shown < (0.2 if self._tty else 5.0):
            return
        self._shown = now
        rate = synced / max(now - self._started, 1e-6)
        line = f"synced {synced} conversations ({rate:.0f}/s)"
        if self._tty:
            print(f"\r{line}", end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _ms_to_iso(ms: int | None) -> str:
    if ms is None:
        return "soon"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


@dataclass
class _Totals:
    synced: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    events_inserted: int = 0

    def describe(self) -> str:
        return ", ".join(f"{f.name.replace('_', ' ')} {getattr(self, f.name)}" for f in fields(self))


async def run_sync_command(
    settings: Settings,
    storage: Storage,
    page_id: str,
    mode: str | None,
    *,
    graph_transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """`python app.py sync PAGE_ID`: sync until done, on an opened (migrated) storage.

    Exit code 0 on success, 1 when the sync fails (its message on stderr), 2 for an unknown page.
    """
    if mode not in (None, "incremental", "full"):
        print(f"error: mode must be incremental or full, not {mode!r}", file=sys.stderr)
        return 2
    page = await storage.find_page(page_id)
    if page is None:
        print(f"error: no page with pageId {page_id} (see GET /api/pages)", file=sys.stderr)
        return 2
    pool = RatePool(storage, PoolPolicy.from_settings(settings))
    transport = PooledTransport(graph_transport or httpx.AsyncHTTPTransport(), pool)
    async with httpx.AsyncClient(
        base_url=settings.graph_api_url, timeout=GRAPH_TIMEOUT, transport=transport
    ) as http:
        engine = SyncEngine(storage, GraphClient(http, pacing_max_delay=0.0), settings, Metrics())
        try:
            return await _sync_until_done(engine, page, cast(Literal["incremental", "full"] | None, mode))
        finally:
            await engine.aclose()


async def _sync_until_done(
    engine: SyncEngine, page: Page, mode: Literal["incremental", "full"] | None
) -> int:
    line = _ProgressLine()
    totals = _Totals()
    resume: str | None = None
    rounds = 0
    while True:
        request = SyncRequest(
            page_id=page.id, facebook_page_id=page.facebook_page_id, resume_session=resume, mode=mode
        )

        def show(synced_now: int, before: int = totals.synced) -> None:
            line.show(before + synced_now)

        try:
            result = await engine.sync(page.user_id, request, on_page=show)
        except SyncInProgress as exc:
            print(
                f"error: another sync of this page is running; its lock expires at "
                f"{_ms_to_iso(exc.extra.get('expiresAt'))}",
                file=sys.stderr,
            )
            return 1
        except GraphAuthError as exc:
            print(f"error: {exc.message} [graph_auth]", file=sys.stderr)
            return 1
        except ServiceError as exc:
            retry = exc.extra.get("retryAfter")
            hint = f"; try again in {retry} s" if retry is not None else ""
            print(f"error: {exc.message} [{exc.code}]{hint}", file=sys.stderr)
            return 1
        rounds += 1
        for f in fields(totals):
            setattr(totals, f.name, getattr(totals, f.name) + getattr(result, f.name))
        if not result.has_more:
            break
        resume = result.resume_session
    line.show(totals.synced, final=True)
    print(f"done in {rounds} request(s): session {result.session_id}, {totals.describe()}", file=sys.stderr)
    return 0
