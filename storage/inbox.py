"""The webhook inbox (`webhook_events`): bodies recorded before the 200, then applied.

A mixin of `SQLStorage`: the same engine, and the same conversation write path.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.records import ConversationRecord
from storage.base import ApplyReport, InboxBody, ParsedInboxBody, WebhookParser, WriteCounts
from storage.engine import Conn, Engine, retry_transient

# webhook_events.error holds at most this many characters.
MAX_ERROR_CHARS = 2000
# What an unsent message's stored event keeps of its payload.
_UNSENT_PAYLOAD = '{"is_deleted": true}'


def error_text(error: str | None) -> str | None:
    """An error as webhook_events.error holds it: without U+0000 (PostgreSQL text cannot hold it), bounded."""
    if error is None:
        return None
    return error.replace("\x00", "")[:MAX_ERROR_CHARS]


async def _drop_unsent_content(conn: Conn, unsent: Sequence[tuple[str, str, str]]) -> None:
    """Unsent messages (page row, contact, mid): their stored event keeps its row, loses its content.

    A conversation whose preview is that message loses the preview too (its version bumped,
    like every change of a conversation).
    """
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


class InboxStorage:
    """The inbox half of `storage.base.Storage`."""

    engine: Engine

    async def _write_records(
        self, conn: Conn, page_id: str, records: Sequence[ConversationRecord], *, expect_new: bool = False
    ) -> WriteCounts:
        """Provided by SQLStorage: the conversation write path, in the caller's transaction."""
        raise NotImplementedError

    async def record_webhook_batch(self, bodies: Sequence[InboxBody]) -> None:
        if not bodies:
            return
        # One statement, so it needs no BEGIN/COMMIT around it: the webhook's hot path.
        async with self.engine.autocommit() as conn:
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

    @retry_transient
    async def apply_webhook_batch(
        self, parse: WebhookParser, limit: int, ids: Sequence[int] | None = None
    ) -> ApplyReport:
        report = ApplyReport()
        async with self.engine.transaction() as conn:
            if ids is None:
                claimed = await conn.fetch(
                    "SELECT id, body, received_at FROM webhook_events WHERE status = 'pending' "
                    "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    limit,
                )
            else:
                cond, args = conn.any_of(1, ids, "bigint")
                claimed = await conn.fetch(
                    "SELECT id, body, received_at FROM webhook_events "
                    f"WHERE status = 'pending' AND id {cond} ORDER BY id FOR UPDATE SKIP LOCKED",
                    *args,
                )
            if not claimed:
                return report
            report.claimed = len(claimed)
            status: dict[int, tuple[str, str | None]] = {}
            parsed: dict[int, ParsedInboxBody] = {}
            for row in claimed:
                try:
                    parsed[row["id"]] = parse(bytes(row["body"]))
                except Exception as exc:  # a body that cannot be read stays replayable after a fix
                    status[row["id"]] = ("invalid", error_text(str(exc)))
            fb_ids = sorted({fb for body in parsed.values() for fb in body.pages})
            page_rows: dict[str, list[str]] = {}
            if fb_ids:
                cond, args = conn.any_of(1, fb_ids, "text")
                for r in await conn.fetch(
                    f"SELECT id, facebook_page_id FROM facebook_pages WHERE facebook_page_id {cond} "
                    "ORDER BY id",
                    *args,
                ):
                    page_rows.setdefault(r["facebook_page_id"], []).append(r["id"])
            by_page: dict[str, list[ConversationRecord]] = {}
            unsent: list[tuple[str, str, str]] = []
            for inbox_id, body in parsed.items():
                # `applied` once the body is for a registered page, even when none of its items
                # is of a kind we store; `ignored` means no registered page (SPEC semantics 10).
                registered = any(fb in page_rows for fb in body.pages)
                status[inbox_id] = ("applied" if registered else "ignored", error_text(body.error))
                for fb, rec in body.items:
                    for pid in page_rows.get(fb, ()):
                        by_page.setdefault(pid, []).append(rec)
                unsent.extend(
                    (pid, contact, mid) for fb, contact, mid in body.unsent for pid in page_rows.get(fb, ())
                )
            for pid in sorted(by_page):
                report.counts.add(await self._write_records(conn, pid, by_page[pid]))
            if unsent:  # after the writes: a message and its unsend may come in one batch
                await _drop_unsent_content(conn, unsent)
            received = {row["id"]: row["received_at"] for row in claimed}
            report.received_at = [received[i] for i, (st, _) in status.items() if st == "applied"]
            for name in ("applied", "ignored", "invalid"):
                these = [(i, err) for i, (st, err) in status.items() if st == name]
                setattr(report, name, len(these))
                if these:
                    source, args = conn.rows(("bigint", "text"), these, 2)
                    await conn.execute(
                        f"WITH v (wid, error) AS ({source}) "
                        "UPDATE webhook_events AS w SET status = $1, error = v.error, "
                        "attempts = w.attempts + 1, "
                        "applied_at = CASE WHEN $1 = 'applied' THEN now_ms() ELSE NULL END "
                        "FROM v WHERE w.id = v.wid",
                        name,
                        *args,
                    )
        return report

    async def mark_webhook_failed(self, ids: Sequence[int], error: str) -> None:
        async with self.engine.transaction() as conn:
            cond, args = conn.any_of(2, ids, "bigint")
            await conn.execute(
                "UPDATE webhook_events SET status = 'failed', error = $1, attempts = attempts + 1 "
                f"WHERE status = 'pending' AND id {cond}",
                error_text(error),
                *args,
            )

    async def pending_webhook_ids(self, limit: int) -> list[int]:
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT id FROM webhook_events WHERE status = 'pending' ORDER BY id LIMIT $1", limit
            )
        return [r["id"] for r in rows]

    async def requeue_webhooks(self, statuses: Sequence[str], *, with_skipped_items: bool = False) -> int:
        async with self.engine.transaction() as conn:
            cond, args = conn.any_of(1, statuses, "text")
            # An applied row with an error skipped items: applying it again (idempotent) after a
            # fix writes what was skipped.
            skipped = " OR (status = 'applied' AND error IS NOT NULL)" if with_skipped_items else ""
            return await conn.execute(
                f"UPDATE webhook_events SET status = 'pending' WHERE status {cond}{skipped}", *args
            )

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
