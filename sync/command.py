"""`python app.py sync PAGE_ID`: the API's sync from a terminal, resumed until done.

It opens its own storage and Graph client, runs `SyncEngine.sync` again while it answers
`hasMore`, and shows a progress line on stderr.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Literal, cast

import httpx

from core.errors import GraphAuthError, ServiceError, SyncInProgress
from core.metrics import Metrics
from core.settings import Settings
from schema.api import SyncRequest
from storage import open_storage
from storage.base import Page
from sync.engine import SyncEngine
from sync.graph_client import GRAPH_TIMEOUT, GraphClient


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


async def run_sync_command(settings: Settings, page_id: str, mode: str | None) -> int:
    """`python app.py sync PAGE_ID`: sync until done.

    Exit code 0 on success, 1 when the sync fails (its message on stderr), 2 for an unknown page.
    """
    if mode not in (None, "incremental", "full"):
        print(f"error: mode must be incremental or full, not {mode!r}", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per Graph request would bury the progress
    storage = await open_storage(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        await storage.migrate()
        page = await storage.find_page(page_id)
        if page is None:
            print(f"error: no page with pageId {page_id} (see GET /api/pages)", file=sys.stderr)
            return 2
        async with httpx.AsyncClient(base_url=settings.graph_api_url, timeout=GRAPH_TIMEOUT) as http:
            engine = SyncEngine(storage, GraphClient(http), settings, Metrics())
            return await _sync_until_done(engine, page, cast(Literal["incremental", "full"] | None, mode))
    finally:
        await storage.close()


async def _sync_until_done(
    engine: SyncEngine, page: Page, mode: Literal["incremental", "full"] | None
) -> int:
    line = _ProgressLine()
    totals = {"synced": 0, "inserted": 0, "updated": 0, "unchanged": 0, "skipped": 0, "eventsInserted": 0}
    resume: str | None = None
    rounds = 0
    while True:
        request = SyncRequest(
            page_id=page.id, facebook_page_id=page.facebook_page_id, resume_session=resume, mode=mode
        )

        def show(synced_now: int, before: int = totals["synced"]) -> None:
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
        for key in totals:
            totals[key] += result[key]
        if not result["hasMore"]:
            break
        resume = result["resumeSession"]
    line.show(totals["synced"], final=True)
    print(
        f"done in {rounds} request(s): session {result['syncSessionId']}, "
        + ", ".join(f"{k} {v}" for k, v in totals.items()),
        file=sys.stderr,
    )
    return 0
