"""The webhook inbox (`webhook_events`): bodies recorded before the 200, then applied.

A mixin of `SQLStorage`: the same engine, and the same conversation write path.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.records import ConversationRecord
from storage.base import ApplyReport, InboxBody, WebhookParser, WriteCounts
from storage.engine import Conn, Engine, retry_transient


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
            parsed: dict[int, Sequence[tuple[str, ConversationRecord]]] = {}
            for row in claimed:
                try:
                    parsed[row["id"]] = parse(bytes(row["body"]))
                except Exception as exc:  # a body the schema no longer accepts stays replayable
                    status[row["id"]] = ("invalid", str(exc)[:2000])
            fb_ids = sorted({fb for items in parsed.values() for fb, _ in items})
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
            for inbox_id, items in parsed.items():
                targets = [(pid, rec) for fb, rec in items for pid in page_rows.get(fb, ())]
                status[inbox_id] = ("applied", None) if targets else ("ignored", None)
                for pid, rec in targets:
                    by_page.setdefault(pid, []).append(rec)
            for pid in sorted(by_page):
                report.counts.add(await self._write_records(conn, pid, by_page[pid]))
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
                error[:2000],
                *args,
            )

    async def pending_webhook_ids(self, limit: int) -> list[int]:
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT id FROM webhook_events WHERE status = 'pending' ORDER BY id LIMIT $1", limit
            )
        return [r["id"] for r in rows]

    async def requeue_webhooks(self, statuses: Sequence[str]) -> int:
        async with self.engine.transaction() as conn:
            cond, args = conn.any_of(1, statuses, "text")
            return await conn.execute(
                f"UPDATE webhook_events SET status = 'pending' WHERE status {cond}", *args
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
