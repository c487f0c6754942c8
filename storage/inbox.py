"""The webhook inbox (`webhook_events`): bodies recorded before the 200, then applied.

Recording and the operator's views are `InboxStorage` methods (a mixin of `SQLStorage`). Applying
is a business rule (which page rows a body goes to; applied, ignored or invalid: see
`webhook/apply.py`), composed from the primitives of `Transaction`, all inside one transaction:

    await storage.run_interaction("apply_webhooks", fn)    fn(txn) awaits only txn's methods:
        txn.claim_pending(limit) / txn.claim(ids)           pending rows, locked (SKIP LOCKED)
        txn.page_rows(facebook_page_ids)                    the page rows of each Facebook page
        txn.write_records(page_row, records)                conversations and events of a page row
        txn.drop_unsent_content(unsent)                     unsent messages lose their content
        txn.mark(status, [(id, error), ...])                rows end applied / ignored / invalid
"""

from __future__ import annotations

from collections.abc import Sequence

from core.records import ConversationRecord
from storage.base import InboxBody, WriteCounts
from storage.conversations import write_records
from storage.engine import Conn, Store
from storage.notify import INBOX
from storage.rows import InboxRow

# webhook_events.error holds at most this many characters.
MAX_ERROR_CHARS = 2000
# What an unsent message's stored event keeps of its payload.
_UNSENT_PAYLOAD = '{"is_deleted": true}'
# Statuses a row may end in when it is applied.
APPLY_STATUSES = ("applied", "ignored", "invalid")


def error_text(error: str | None) -> str | None:
    """An error as webhook_events.error holds it: without U+0000 (PostgreSQL text cannot hold it), bounded."""
    if error is None:
        return None
    return error.replace("\x00", "")[:MAX_ERROR_CHARS]


class Transaction:
    """The primitives a business rule composes inside one write transaction (`run_interaction`).

    Each method is a coroutine that awaits only the connection: the transaction function that
    calls them may await nothing else (on SQLite it runs on the writer thread, in one go).
    """

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    async def claim_pending(self, limit: int) -> list[InboxRow]:
        """Up to `limit` pending inbox rows, oldest first, locked for this transaction (rows another
        replica's transaction holds are skipped, not waited for)."""
        rows = await self._conn.fetch(
            "SELECT id, body, received_at FROM webhook_events WHERE status = 'pending' "
            "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            limit,
        )
        return [InboxRow(r["id"], bytes(r["body"]), r["received_at"]) for r in rows]

    async def claim(self, ids: Sequence[int]) -> list[InboxRow]:
        """The inbox rows of `ids` that are still pending, locked like `claim_pending`'s."""
        cond, args = self._conn.any_of(1, ids, "bigint")
        rows = await self._conn.fetch(
            "SELECT id, body, received_at FROM webhook_events "
            f"WHERE status = 'pending' AND id {cond} ORDER BY id FOR UPDATE SKIP LOCKED",
            *args,
        )
        return [InboxRow(r["id"], bytes(r["body"]), r["received_at"]) for r in rows]

    async def page_rows(self, facebook_page_ids: Sequence[str]) -> dict[str, list[str]]:
        """{facebook page id: the ids of its page rows (one per user who registered it)}."""
        if not facebook_page_ids:
            return {}
        cond, args = self._conn.any_of(1, sorted(set(facebook_page_ids)), "text")
        page_rows: dict[str, list[str]] = {}
        for r in await self._conn.fetch(
            f"SELECT id, facebook_page_id FROM facebook_pages WHERE facebook_page_id {cond} ORDER BY id",
            *args,
        ):
            page_rows.setdefault(r["facebook_page_id"], []).append(r["id"])
        return page_rows

    async def write_records(self, page_id: str, records: Sequence[ConversationRecord]) -> WriteCounts:
        """Upsert conversation records and their events for one page row (`storage/conversations.py`)."""
        return await write_records(self._conn, page_id, records)

    async def drop_unsent_content(self, unsent: Sequence[tuple[str, str, str]]) -> None:
        """Unsent messages (page row, contact, mid): their stored event keeps its row, loses its content.

        A conversation whose preview is that message loses the preview too (its version bumped,
        like every change of a conversation).
        """
        if not unsent:
            return
        conn = self._conn
        source, args = conn.rows(("text", "text", "text"), unsent, 1)
        rows = await conn.fetch(
            f"WITH d (pid, sid, mid) AS ({source}) "
            f"UPDATE contact_interaction_events AS e SET content = NULL, payload = '{_UNSENT_PAYLOAD}' "
            "FROM d, messenger_conversations AS c "
            "WHERE c.page_id = d.pid AND c.sender_id = d.sid AND e.conversation_id = c.id "
            "AND e.event_type IN ('message_received', 'message_sent') AND e.message_id = d.mid "
            "RETURNING conversation_id, event_timestamp",
            *args,
        )
        if not rows:
            return
        source, args = conn.rows(
            ("bigint", "bigint"), [(r["conversation_id"], r["event_timestamp"]) for r in rows], 1
        )
        await conn.execute(
            f"WITH x (cid, ts) AS ({source}) "
            "UPDATE messenger_conversations AS c SET last_message = NULL, version = c.version + 1, "
            "updated_at = now_ms() "
            "FROM x WHERE c.id = x.cid AND c.last_message_time = x.ts AND c.last_message IS NOT NULL",
            *args,
        )

    async def mark(self, status: str, rows: Sequence[tuple[int, str | None]]) -> None:
        """Inbox rows (id, error) end `status` (applied, ignored or invalid), with that error kept
        (bounded, without U+0000), one more attempt counted, `applied_at` set for applied ones."""
        if status not in APPLY_STATUSES:
            raise ValueError(f"not a status an applied row ends in: {status!r}")
        if not rows:
            return
        source, args = self._conn.rows(("bigint", "text"), [(i, error_text(e)) for i, e in rows], 2)
        await self._conn.execute(
            f"WITH v (wid, error) AS ({source}) "
            "UPDATE webhook_events AS w SET status = $1, error = v.error, "
            "attempts = w.attempts + 1, "
            "applied_at = CASE WHEN $1 = 'applied' THEN now_ms() ELSE NULL END "
            "FROM v WHERE w.id = v.wid",
            status,
            *args,
        )


class InboxStorage(Store):
    """The inbox half of `storage.base.Storage`: recording bodies, and the operator's views."""

    async def record_webhook_batch(self, bodies: Sequence[InboxBody]) -> None:
        if not bodies:
            return

        async def record(conn: Conn) -> None:
            source, args = conn.rows(
                ("bytea", "text", "text", "text"),
                [(b.body, b.body_sha256, b.status, b.error) for b in bodies],
                1,
            )
            await conn.execute(
                f"INSERT INTO webhook_events (body, body_sha256, status, error) {source} "
                "ON CONFLICT (body_sha256) DO NOTHING",
                *args,
            )
            if any(b.status == "pending" for b in bodies):
                conn.notify(INBOX)  # the appliers, on every replica

        # One statement, so it needs no BEGIN/COMMIT around it: the webhook's hot path.
        await self._interaction("record_webhook_batch", record, single_statement=True)

    async def mark_webhook_failed(self, ids: Sequence[int], error: str) -> None:
        async def mark(conn: Conn) -> None:
            cond, args = conn.any_of(2, ids, "bigint")
            await conn.execute(
                "UPDATE webhook_events SET status = 'failed', error = $1, attempts = attempts + 1 "
                f"WHERE status = 'pending' AND id {cond}",
                error_text(error),
                *args,
            )

        await self._interaction("mark_webhook_failed", mark)

    async def pending_webhook_ids(self, limit: int) -> list[int]:
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT id FROM webhook_events WHERE status = 'pending' ORDER BY id LIMIT $1", limit
            )
        return [r["id"] for r in rows]

    async def requeue_webhooks(self, statuses: Sequence[str], *, with_skipped_items: bool = False) -> int:
        async def requeue(conn: Conn) -> int:
            cond, args = conn.any_of(1, statuses, "text")
            # An applied row with an error skipped items: applying it again (idempotent) after a
            # fix writes what was skipped.
            skipped = " OR (status = 'applied' AND error IS NOT NULL)" if with_skipped_items else ""
            n = await conn.execute(
                f"UPDATE webhook_events SET status = 'pending' WHERE status {cond}{skipped}", *args
            )
            if n:
                conn.notify(INBOX)
            return n

        return await self._interaction("requeue_webhooks", requeue)

    async def webhook_status_counts(self) -> dict[str, int]:
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT status, count(*) AS n FROM webhook_events GROUP BY status ORDER BY status"
            )
        return {r["status"]: r["n"] for r in rows}

    async def pending_webhook_count(self) -> int:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow("SELECT count(*) AS n FROM webhook_events WHERE status = 'pending'")
        return int(row["n"]) if row is not None else 0
