"""What the dashboard and the operator views read: inbox trouble, a page's events per minute, key ids.

A mixin of `SQLStorage` (the same engine); reads only, each on a reader connection. Times are
milliseconds from the database's clock, like everything the storage decides with.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.engine import Engine

MINUTE_MS = 60_000


@dataclass(frozen=True)
class InboxError:
    """An inbox row the applier could not apply (`failed`) or read (`invalid`)."""

    id: int
    status: str
    error: str | None
    received_at: int


@dataclass(frozen=True)
class MinuteCount:
    """The events stored for a page in one minute (`minute` is its start, ms)."""

    minute: int
    events: int


class ActivityStorage:
    """The dashboard's reads of `storage.base.Storage`."""

    engine: Engine

    async def api_key_id(self, key_hash: str) -> int | None:
        """The id of a stored API key (`create-api-key`), or None (a key from API_KEYS has none)."""
        async with self.engine.reader() as conn:
            row = await conn.fetchrow("SELECT id FROM api_keys WHERE key_hash = $1", key_hash)
        return None if row is None else int(row["id"])

    async def recent_webhook_errors(self, limit: int = 20) -> list[InboxError]:
        """The newest `failed` and `invalid` inbox rows, newest first (never their bodies)."""
        async with self.engine.reader() as conn:
            rows = await conn.fetch(
                "SELECT id, status, error, received_at FROM webhook_events "
                "WHERE status IN ('failed', 'invalid') ORDER BY id DESC LIMIT $1",
                limit,
            )
        return [InboxError(r["id"], r["status"], r["error"], r["received_at"]) for r in rows]

    async def oldest_pending_webhook_at(self) -> int | None:
        """When the oldest inbox row still waiting for the applier arrived, or None."""
        async with self.engine.reader() as conn:
            # The partial index on pending ids keeps this cheap however large the inbox is.
            row = await conn.fetchrow(
                "SELECT min(received_at) AS oldest FROM webhook_events WHERE status = 'pending'"
            )
        return None if row is None or row["oldest"] is None else int(row["oldest"])

    async def events_per_minute(self, page_id: str, minutes: int) -> list[MinuteCount]:
        """Events stored for the page (by `created_at`) in each of the last `minutes` minutes, the
        current one included, oldest first; a minute without events counts 0."""
        async with self.engine.reader() as conn:
            now_row = await conn.fetchrow("SELECT now_ms() AS now")
            assert now_row is not None
            # Whole minutes on the database's clock, so every replica draws the same buckets.
            start = (int(now_row["now"]) // MINUTE_MS - (minutes - 1)) * MINUTE_MS
            # Integer division on both engines (BIGINT / integer literal).
            bucket = f"(created_at / {MINUTE_MS}) * {MINUTE_MS}"
            rows = await conn.fetch(
                f"SELECT {bucket} AS minute, count(*) AS n FROM contact_interaction_events "
                f"WHERE page_id = $1 AND created_at >= $2 GROUP BY {bucket}",
                page_id,
                start,
            )
        counts = {int(r["minute"]): int(r["n"]) for r in rows}
        return [
            MinuteCount(minute, counts.get(minute, 0))
            for minute in range(start, start + minutes * MINUTE_MS, MINUTE_MS)
        ]
