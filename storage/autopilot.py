"""Autopilot storage (SPEC semantics 12 and 13): when pages are due, the rate-limit pool, what a
page's status is built from, inbox retention, and deleting a page or a conversation.

A mixin of `SQLStorage`, like `InboxStorage`: the same engine and the same portable SQL. When a
page is due is derived from rows that already exist, so a replica never needs a second lock:

    due_at = max( base,                      no sync yet: created_at; unfinished: its last write;
                                             complete: completed_at + SYNC_INTERVAL_SECONDS
                  sync_schedule.not_before,  a backoff or a rate limit's regain time
                  pool hold_until,           the page's (or the app's) throttle in the pool
                  grace )                    a failure the scheduler has not recorded yet
    excluded while the token is invalid or a live lease holds the page

Because `completed_at` is written in the fenced transaction of a sync's last page, before its
lock is let go, another replica can never mistake a page completed a moment ago for a due one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from storage.base import BodyContacts, DuePage, Page, PageSyncFacts, PoolRow, ScheduleEntry
from storage.engine import Conn, Store, TxnFn

_T = TypeVar("_T")

_POOL_COLUMNS = (
    "next_slot",
    "hold_until",
    "hold_code",
    "usage_pct",
    "usage_at",
    "rate_cap",
    "recent_sends",
    "page_limit",
    "page_limit_at",
    "calls",
    "throttled",
)


def _greatest(*exprs: str) -> str:
    """The largest non-NULL of the expressions (NULL if all are): portable, unlike GREATEST
    (PostgreSQL only; SQLite's max() returns NULL as soon as one argument is NULL)."""
    return (
        "(SELECT MAX(v) FROM ("
        + " UNION ALL ".join(f"SELECT {e} AS v" if i == 0 else f"SELECT {e}" for i, e in enumerate(exprs))
        + ") AS g)"
    )


def _due_sql(interval: str, grace: str) -> str:
    """The due time of a page row `p` joined to `s` (sync_state), `sc` (sync_schedule), `ph`/`ah`
    (its pool row and the app's); `interval` and `grace` are the placeholders of those ms."""
    return _greatest(
        "CASE WHEN s.page_id IS NULL THEN p.created_at "
        f"WHEN s.is_complete THEN COALESCE(s.completed_at, s.updated_at) + {interval} "
        "ELSE s.updated_at END",
        "sc.not_before",
        "ph.hold_until",
        "ah.hold_until",
        # A failure written by a sync whose outcome the scheduler has not recorded yet (it is
        # about to): no other replica retries it at once.
        "CASE WHEN s.last_error IS NOT NULL AND (sc.updated_at IS NULL OR sc.updated_at < s.updated_at) "
        f"THEN s.updated_at + {grace} END",
    )


_JOINS = (
    "FROM facebook_pages p "
    "LEFT JOIN sync_state s ON s.page_id = p.id "
    "LEFT JOIN sync_schedule sc ON sc.page_id = p.id "
    "LEFT JOIN rate_limit_pool ph ON ph.pool_key = 'page:' || p.facebook_page_id "
    "LEFT JOIN rate_limit_pool ah ON ah.pool_key = 'app' "
)


def _schedule(row: Any, prefix: str = "") -> ScheduleEntry:
    return ScheduleEntry(
        page_id=row[f"{prefix}page_id"],
        outcome=row[f"{prefix}outcome"],
        not_before=row[f"{prefix}not_before"],
        failures=row[f"{prefix}failures"],
        last_error=row[f"{prefix}last_error"],
        updated_at=row[f"{prefix}updated_at"],
    )


def _pool_row(row: Any) -> PoolRow:
    values = {name: row[name] for name in _POOL_COLUMNS}
    values["next_slot"] = float(values["next_slot"])
    return PoolRow(key=row["pool_key"], **values)


class AutopilotStorage(Store):
    """The autopilot half of `storage.base.Storage` (see the module docstring)."""

    # ---- the schedule --------------------------------------------------------------------------

    async def due_pages(
        self, interval_ms: int, limit: int, grace_ms: int, exclude: Sequence[str] = ()
    ) -> list[DuePage]:
        async with self.engine.reader() as conn:
            skip, skip_args = "", list[Any]()
            if exclude:
                cond, skip_args = conn.any_of(4, list(exclude), "text")
                skip = f"AND NOT (page_id {cond}) "
            rows = await conn.fetch(
                "SELECT page_id, user_id, facebook_page_id, due_at, now_ms() AS db_now FROM ("
                f"SELECT p.id AS page_id, p.user_id, p.facebook_page_id, {_due_sql('$1', '$3')} AS due_at "
                f"{_JOINS}"
                "WHERE p.token_status = 'valid' AND NOT EXISTS (SELECT 1 FROM sync_locks l "
                "WHERE l.page_id = p.id AND l.locked_by IS NOT NULL AND l.expires_at > now_ms())"
                f") AS due WHERE due_at <= now_ms() {skip}"
                "ORDER BY due_at, page_id LIMIT $2",
                interval_ms,
                limit,
                grace_ms,
                *skip_args,
            )
        return [
            DuePage(
                page_id=r["page_id"],
                user_id=r["user_id"],
                facebook_page_id=r["facebook_page_id"],
                due_at=int(r["due_at"]),
                db_now=int(r["db_now"]),
            )
            for r in rows
        ]

    async def set_schedule(
        self,
        page_id: str,
        outcome: str,
        *,
        not_before: int | None = None,
        delay_ms: int | None = None,
        last_error: str | None = None,
        reset_failures: bool = True,
    ) -> None:
        not_before_sql = _greatest("CAST($3 AS BIGINT)", "now_ms() + CAST($4 AS BIGINT)")

        async def save(conn: Conn) -> None:
            # INSERT ... SELECT ... WHERE EXISTS: a page deleted meanwhile gets no row (and no
            # foreign key error); SQLite needs the WHERE to read ON CONFLICT as an upsert.
            await conn.execute(
                "INSERT INTO sync_schedule (page_id, outcome, not_before, failures, last_error, updated_at) "
                f"SELECT $1, $2, {not_before_sql}, 0, $5, now_ms() "
                "WHERE EXISTS (SELECT 1 FROM facebook_pages WHERE id = $1) "
                "ON CONFLICT (page_id) DO UPDATE SET outcome = excluded.outcome, "
                "not_before = excluded.not_before, last_error = excluded.last_error, "
                "failures = CASE WHEN $6 THEN 0 ELSE sync_schedule.failures END, "
                "updated_at = excluded.updated_at",
                page_id,
                outcome,
                not_before,
                delay_ms,
                None if last_error is None else last_error.replace("\x00", "")[:2000],
                reset_failures,
            )

        await self._interaction("set_schedule", save)

    async def record_sync_failure(
        self, page_id: str, error: str, base_ms: int, cap_ms: int
    ) -> ScheduleEntry | None:
        async def record(conn: Conn) -> Any:
            row = await conn.fetchrow(
                "SELECT failures FROM sync_schedule WHERE page_id = $1 FOR UPDATE", page_id
            )
            failures = (row["failures"] if row is not None else 0) + 1
            # Doubling from base, capped: 2**n stays small because the cap is reached quickly.
            delay = min(cap_ms, base_ms * 2 ** min(failures - 1, 30))
            return await conn.fetchrow(
                "INSERT INTO sync_schedule (page_id, outcome, not_before, failures, last_error, updated_at) "
                "SELECT $1, 'error', now_ms() + $2, $3, $4, now_ms() "
                "WHERE EXISTS (SELECT 1 FROM facebook_pages WHERE id = $1) "
                "ON CONFLICT (page_id) DO UPDATE SET outcome = excluded.outcome, "
                "not_before = excluded.not_before, failures = excluded.failures, "
                "last_error = excluded.last_error, updated_at = excluded.updated_at "
                "RETURNING *",
                page_id,
                int(delay),
                failures,
                error.replace("\x00", "")[:2000],
            )

        saved = await self._interaction("record_sync_failure", record)
        return None if saved is None else _schedule(saved)

    async def page_sync_facts(
        self,
        user_id: str | None,
        page_id: str | None,
        interval_ms: int,
        grace_ms: int,
        *,
        count_conversations: bool = True,
    ) -> list[PageSyncFacts]:
        counted = (
            "(SELECT count(*) FROM messenger_conversations c WHERE c.page_id = p.id)"
            if count_conversations
            else "0"
        )
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT p.*, now_ms() AS db_now, "
                f"{counted} AS conversations, "
                "s.sync_session_id, s.is_complete, s.total_synced, s.completed_syncs, s.completed_at, "
                "s.updated_at AS state_updated_at, s.last_error AS state_error, "
                "sc.page_id AS sc_page_id, sc.outcome AS sc_outcome, sc.not_before AS sc_not_before, "
                "sc.failures AS sc_failures, sc.last_error AS sc_last_error, sc.updated_at AS sc_updated_at, "
                "(SELECT l.expires_at FROM sync_locks l WHERE l.page_id = p.id AND l.locked_by IS NOT NULL "
                "AND l.expires_at > now_ms()) AS lock_expires_at, "
                f"{_greatest('ph.hold_until', 'ah.hold_until')} AS hold_until, "
                f"CASE WHEN p.token_status = 'valid' THEN {_due_sql('$3', '$4')} END AS due_at "
                f"{_JOINS}"
                "WHERE (CAST($1 AS TEXT) IS NULL OR p.user_id = $1) "
                "AND (CAST($2 AS TEXT) IS NULL OR p.id = $2) "
                "ORDER BY p.user_id, p.created_at, p.id",
                user_id,
                page_id,
                interval_ms,
                grace_ms,
            )
        facts = []
        for r in rows:
            now = int(r["db_now"])
            hold = r["hold_until"]
            facts.append(
                PageSyncFacts(
                    page=Page(
                        id=r["id"],
                        user_id=r["user_id"],
                        facebook_page_id=r["facebook_page_id"],
                        name=r["name"],
                        token_status=r["token_status"],
                        created_at=r["created_at"],
                        updated_at=r["updated_at"],
                        access_token=r["access_token"],
                    ),
                    db_now=now,
                    conversations=int(r["conversations"]),
                    session_id=r["sync_session_id"],
                    is_complete=None if r["is_complete"] is None else bool(r["is_complete"]),
                    total_synced=int(r["total_synced"] or 0),
                    completed_syncs=int(r["completed_syncs"] or 0),
                    completed_at=r["completed_at"],
                    state_updated_at=r["state_updated_at"],
                    state_error=r["state_error"],
                    schedule=None if r["sc_page_id"] is None else _schedule(r, "sc_"),
                    lock_expires_at=r["lock_expires_at"],
                    hold_until=int(hold) if hold is not None and hold > now else None,
                    due_at=None if r["due_at"] is None else int(r["due_at"]),
                )
            )
        return facts

    # ---- the rate-limit pool ---------------------------------------------------------------------

    async def _lock_pool_rows(self, conn: Conn, keys: Sequence[str]) -> list[Any]:
        cond, args = conn.any_of(1, list(keys), "text")
        # In key order, so that two transactions locking 'app' and a page never deadlock.
        return await conn.fetch(
            f"SELECT * FROM rate_limit_pool WHERE pool_key {cond} ORDER BY pool_key FOR UPDATE", *args
        )

    async def update_rate_pool(
        self, keys: Sequence[str], decide: Callable[[int, dict[str, PoolRow]], _T]
    ) -> _T:
        # `decide` runs inside the transaction (on SQLite, on the writer thread): it only computes.
        async def update(conn: Conn) -> _T:
            rows = await self._lock_pool_rows(conn, keys)
            if len(rows) < len(set(keys)):
                source, args = conn.rows(("text",), [(k,) for k in sorted(set(keys))], 1)
                await conn.execute(
                    f"INSERT INTO rate_limit_pool (pool_key) {source} ON CONFLICT (pool_key) DO NOTHING",
                    *args,
                )
                rows = await self._lock_pool_rows(conn, keys)
            # The clock is read once the rows are ours: a slot decided on a time read before a
            # wait for another replica's lock would be in the past.
            now_row = await conn.fetchrow("SELECT now_ms() AS now")
            assert now_row is not None
            pool = {r["pool_key"]: _pool_row(r) for r in rows}
            before = {key: replace(row) for key, row in pool.items()}
            result = decide(int(now_row["now"]), pool)
            for key, row in pool.items():
                if row == before[key]:
                    continue  # nothing changed: no write
                sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(_POOL_COLUMNS))
                await conn.execute(
                    f"UPDATE rate_limit_pool SET {sets}, updated_at = now_ms() WHERE pool_key = $1",
                    key,
                    *(getattr(row, c) for c in _POOL_COLUMNS),
                )
            return result

        return await self._interaction("update_rate_pool", update)

    async def rate_pool_rows(self, keys: Sequence[str]) -> tuple[int, dict[str, PoolRow]]:
        async with self.engine.reader() as conn:
            cond, args = conn.any_of(1, list(keys), "text")
            rows = await conn.fetch(f"SELECT * FROM rate_limit_pool WHERE pool_key {cond}", *args)
            now_row = await conn.fetchrow("SELECT now_ms() AS now")
        assert now_row is not None
        return int(now_row["now"]), {r["pool_key"]: _pool_row(r) for r in rows}

    # ---- housekeeping ----------------------------------------------------------------------------

    async def delete_expired_webhook_events(self, max_age_ms: int, limit: int) -> int:
        async def delete(conn: Conn) -> int:
            # SKIP LOCKED (PostgreSQL): replicas running retention at once take different rows
            # instead of waiting on each other; only applied and ignored rows ever go.
            return await conn.execute(
                "DELETE FROM webhook_events WHERE id IN (SELECT id FROM webhook_events "
                "WHERE status IN ('applied', 'ignored') AND received_at < now_ms() - $1 "
                "ORDER BY received_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                max_age_ms,
                limit,
            )

        return await self._interaction("delete_expired_webhook_events", delete)

    # ---- deleting data -----------------------------------------------------------------------------

    async def delete_page(self, user_id: str, page_id: str) -> bool:
        async def delete(conn: Conn) -> bool:
            owned = await conn.fetchrow(
                "SELECT id FROM facebook_pages WHERE id = $1 AND user_id = $2", page_id, user_id
            )
            if owned is None:
                return False
            # The lock row first (page ids are never reused, so its fencing token need not
            # survive): a sync running now finds its lease gone at its next fenced write and
            # stops with LeaseLost, instead of writing rows for a page that no longer exists.
            # On PostgreSQL this waits for a fenced write in flight, which holds the row.
            await conn.execute("DELETE FROM sync_locks WHERE page_id = $1", page_id)
            # Conversations, events, sync_state and sync_schedule go with it (ON DELETE CASCADE);
            # its inbox rows stay until retention (they may serve another user's row of the Page).
            deleted = await conn.execute(
                "DELETE FROM facebook_pages WHERE id = $1 AND user_id = $2", page_id, user_id
            )
            return deleted == 1

        return await self._interaction("delete_page", delete)

    async def delete_conversation(
        self, user_id: str, conversation_id: int, contacts_of: BodyContacts, batch: int = 500
    ) -> bool:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow(
                "SELECT c.page_id, c.sender_id, p.facebook_page_id FROM messenger_conversations c "
                "JOIN facebook_pages p ON p.id = c.page_id WHERE c.id = $1 AND p.user_id = $2",
                conversation_id,
                user_id,
            )
        if row is None:
            return False
        fb_page, contact = row["facebook_page_id"], row["sender_id"]
        # The inbox first, the conversation last: if this stops half-way the conversation is
        # still there, so asking again finishes the job. Candidates are the bodies that contain
        # the PSID's digits at all; each is then read, and deleted only if every item naming a
        # contact names this one on this Page.
        after = 0
        needle = contact.encode()
        while True:
            async with self.engine.reader() as conn:
                candidates = await conn.fetch(
                    "SELECT id, body FROM webhook_events WHERE id > $1 AND instr(body, $2) > 0 "
                    "ORDER BY id LIMIT $3",
                    after,
                    needle,
                    batch,
                )
            if not candidates:
                break
            after = candidates[-1]["id"]
            doomed = [
                c["id"] for c in candidates if _only_contact(contacts_of, bytes(c["body"]), fb_page, contact)
            ]
            if doomed:
                await self._interaction("delete_conversation_inbox", _delete_inbox_rows(doomed))
            if len(candidates) < batch:
                break

        async def delete(conn: Conn) -> int:
            # Its events go with it (ON DELETE CASCADE).
            return await conn.execute(
                "DELETE FROM messenger_conversations WHERE id = $1 AND page_id = $2",
                conversation_id,
                row["page_id"],
            )

        return await self._interaction("delete_conversation", delete) == 1


def _delete_inbox_rows(ids: Sequence[int]) -> TxnFn[None]:
    """A transaction function deleting these inbox rows."""

    async def delete(conn: Conn) -> None:
        cond, args = conn.any_of(1, ids, "bigint")
        await conn.execute(f"DELETE FROM webhook_events WHERE id {cond}", *args)

    return delete


def _only_contact(contacts_of: BodyContacts, body: bytes, fb_page: str, contact: str) -> bool:
    """Whether every item of the body that names a contact is this contact's, on this Page."""
    try:
        named = set(contacts_of(body))
    except Exception:  # a body we cannot read is kept: we cannot tell whose it is
        return False
    return named == {(fb_page, contact)}
