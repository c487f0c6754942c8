"""A page's sync status as a person reads it: GET /api/pages[/{pageId}] and ``python app.py status``.

    phase                  when
    paused_token_invalid   Facebook refused the token (190): waits until POST /api/pages registers a new one
    rate_limited           the rate-limit pool holds the page (or the app) until ``until``
    error                  the last scheduled sync failed; the next try is at ``until``
    backfilling            no complete sync yet, or a sync is running a session not yet complete
    idle                   complete; the next incremental sync is at ``next_run_at``

Times are milliseconds since the epoch (the database's clock). With background syncs off
(SYNC_INTERVAL_SECONDS=0) ``next_run_at`` is None. BACKGROUND_WORK=off does not change it: an
API-only replica cannot see the worker (``python app.py worker``) that runs its pages' syncs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

import msgspec

from core.settings import Settings
from storage import Storage
from storage.base import PageSyncFacts

Phase = Literal["backfilling", "idle", "paused_token_invalid", "rate_limited", "error"]
PHASES: tuple[Phase, ...] = ("backfilling", "idle", "paused_token_invalid", "rate_limited", "error")
# A failure the scheduler has not recorded yet holds a page this long (storage.due_pages's grace).
PENDING_GRACE_MS = 10_000


class PageStatus(msgspec.Struct, kw_only=True, rename="camel"):
    """One page's sync status (snake_case here, camelCase on the wire)."""

    page_id: str
    user_id: str
    facebook_page_id: str
    name: str | None
    token_status: str
    phase: Phase
    until: int | None  # rate_limited: the regain time; error: the next try
    conversations: int  # stored now
    syncing: bool  # a sync (scheduled or manual) holds the page's lock right now
    backfill_progress: int | None  # conversations synced so far by the unfinished session
    last_complete_sync_at: int | None
    next_run_at: int | None
    last_error: str | None


def build_status(facts: PageSyncFacts, *, scheduler_enabled: bool) -> PageStatus:
    """The status of one page from what storage read about it."""
    now = facts.db_now
    schedule = facts.schedule
    syncing = facts.lock_expires_at is not None
    unfinished = facts.is_complete is False
    # The schedule speaks for the page only if nothing happened to it since the scheduler wrote.
    schedule_current = schedule is not None and (
        facts.state_updated_at is None or schedule.updated_at >= facts.state_updated_at
    )
    phase: Phase
    until = None
    if facts.page.token_status == "invalid":
        phase = "paused_token_invalid"
    elif facts.hold_until is not None:
        phase, until = "rate_limited", facts.hold_until
    elif (
        schedule is not None
        and schedule_current
        and schedule.outcome in ("rate_limited", "error")
        and schedule.not_before is not None
        and schedule.not_before > now
        and not syncing
    ):
        phase, until = (
            ("rate_limited" if schedule.outcome == "rate_limited" else "error"),
            schedule.not_before,
        )
    elif facts.completed_syncs == 0 or (syncing and unfinished):
        phase = "backfilling"
    else:
        phase = "idle"
    last_error = None
    if schedule is not None and schedule_current and schedule.last_error:
        last_error = schedule.last_error
    elif facts.state_error:
        last_error = facts.state_error
    # A page being synced has no next run until this one ends; a paused one waits for a new token.
    next_run = None
    if scheduler_enabled and phase != "paused_token_invalid" and not syncing:
        next_run = facts.due_at
    return PageStatus(
        page_id=facts.page.id,
        user_id=facts.page.user_id,
        facebook_page_id=facts.page.facebook_page_id,
        name=facts.page.name,
        token_status=facts.page.token_status,
        phase=phase,
        until=until,
        conversations=facts.conversations,
        syncing=syncing,
        backfill_progress=facts.total_synced if unfinished else None,
        last_complete_sync_at=facts.completed_at,
        next_run_at=next_run,
        last_error=last_error,
    )


def syncs_scheduled(settings: Settings) -> bool:
    """Whether pages get background syncs in this deployment (by some process: this one, or a worker)."""
    return settings.sync_interval_seconds > 0


async def page_statuses(
    storage: Storage, settings: Settings, user_id: str | None, page_id: str | None = None
) -> list[PageStatus]:
    """The statuses of one user's pages (or one page; all users' with user_id None)."""
    facts = await storage.page_sync_facts(
        user_id, page_id, int(settings.sync_interval_seconds * 1000), PENDING_GRACE_MS
    )
    return [build_status(f, scheduler_enabled=syncs_scheduled(settings)) for f in facts]


def _when(ms: int | None, now: int) -> str:
    if ms is None:
        return "-"
    stamp = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    seconds = round((ms - now) / 1000)
    if abs(seconds) < 1:
        return f"{stamp} (now)"
    ago = abs(seconds)
    text = f"{ago}s" if ago < 120 else f"{ago // 60}m" if ago < 7200 else f"{ago // 3600}h"
    return f"{stamp} ({'in ' + text if seconds > 0 else text + ' ago'})"


def format_status_table(statuses: Sequence[PageStatus], now_ms: int) -> str:
    """The statuses as a text table for a terminal (times in UTC, relative to now_ms)."""
    header = (
        "USER",
        "PAGE",
        "FACEBOOK PAGE",
        "NAME",
        "PHASE",
        "CONVERSATIONS",
        "LAST COMPLETE",
        "NEXT RUN",
        "LAST ERROR",
    )
    rows = [header]
    for s in statuses:
        phase: str = s.phase
        if s.until is not None:
            phase += f" until {_when(s.until, now_ms)}"
        elif s.syncing:
            phase += " (syncing)"
        conversations = str(s.conversations)
        if s.backfill_progress is not None:
            conversations += f" (+{s.backfill_progress} this run)"
        error = (s.last_error or "-").replace("\n", " ")
        rows.append(
            (
                s.user_id,
                s.page_id,
                s.facebook_page_id,
                (s.name or "-")[:30],
                phase,
                conversations,
                _when(s.last_complete_sync_at, now_ms),
                _when(s.next_run_at, now_ms),
                error[:80] + ("..." if len(error) > 80 else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    if not statuses:
        lines.append("(no pages registered)")
    return "\n".join(lines)


async def run_status_command(storage: Storage, settings: Settings) -> int:
    """``python app.py status``: every page's status, as a table on stdout (storage opened by the CLI)."""
    facts = await storage.page_sync_facts(
        None, None, int(settings.sync_interval_seconds * 1000), PENDING_GRACE_MS
    )
    statuses = [build_status(f, scheduler_enabled=syncs_scheduled(settings)) for f in facts]
    now = facts[0].db_now if facts else int(time.time() * 1000)
    print(format_status_table(statuses, now))
    if not syncs_scheduled(settings):
        print("(background syncs are off in this configuration: SYNC_INTERVAL_SECONDS=0)")
    return 0
