"""Storage helpers for tests: writes as the service makes them (transaction functions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.records import ConversationRecord
from storage import Storage
from storage.base import ScheduleEntry, WriteCounts
from storage.engine import Conn, run_interaction
from storage.inbox import Transaction


async def write_conversations(
    storage: Storage, page_id: str, records: Sequence[ConversationRecord]
) -> WriteCounts:
    """Upsert records and their events for one page row in one transaction, with the primitive the
    webhook applier composes (`Transaction.write_records`)."""

    async def write(txn: Transaction) -> WriteCounts:
        return await txn.write_records(page_id, records)

    return await storage.run_interaction("write_conversations", write)


async def execute(storage: Storage, sql: str, *args: Any) -> int:
    """Run one write statement in a transaction of its own, through the storage's engine (tests set
    up rows the service has no method for this way); returns the rows it touched."""

    async def statement(conn: Conn) -> int:
        return await conn.execute(sql, *args)

    return await run_interaction(storage.engine, "test statement", statement)  # type: ignore[attr-defined]


async def schedule_of(storage: Storage, page_id: str) -> ScheduleEntry | None:
    """The scheduler's row of a page, as its status reads it (None: never scheduled, or no page)."""
    facts = await storage.page_sync_facts(None, page_id, 0, 0, count_conversations=False)
    return facts[0].schedule if facts else None


async def page_ids_of(storage: Storage, user_id: str) -> list[str]:
    """The ids of a user's pages, oldest first, as GET /api/pages lists them."""
    facts = await storage.page_sync_facts(user_id, None, 0, 0, count_conversations=False)
    return [f.page.id for f in facts]
