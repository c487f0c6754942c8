"""The storage interface written once in SQL, for both engines: `SQLStorage`.

The SQL is PostgreSQL-flavoured and portable: `$1` placeholders, `now_ms()` for the database's
clock, `FOR UPDATE` where PostgreSQL needs a row lock. Each engine (sqlite.py, postgres.py)
supplies connections that translate what they must, plus two helpers for bulk statements (`rows`
and `any_of`), so no engine test appears outside the engines.

`SQLStorage` is put together from one mixin per concern, each on the same engine:

    pages.py       pages and API keys            locks.py      sync locks and sync state
    inbox.py       the webhook inbox, and the    reads.py      conversations, events, the event
                   primitives of `Transaction`                 stream, the monitoring views
    activity.py    the dashboard's reads         autopilot.py  schedule, rate-limit pool, deletes
    keys.py        stored API keys (create, list, revoke, last used)

Every write is a transaction function run by `storage.engine.run_interaction` (retried there on
a transient failure); `run_interaction` below lets a business rule outside storage compose the
primitives of `storage.inbox.Transaction` in one transaction the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from storage.activity import ActivityStorage
from storage.autopilot import AutopilotStorage
from storage.engine import Conn, Engine, run_interaction
from storage.inbox import InboxStorage, Transaction
from storage.keys import KeyStorage
from storage.locks import LockStorage
from storage.notify import EVENTS, INBOX, Subscription
from storage.pages import PageStorage
from storage.reads import ReadStorage

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class SQLStorage(
    PageStorage, KeyStorage, LockStorage, InboxStorage, ReadStorage, ActivityStorage, AutopilotStorage
):
    """`storage.base.Storage` over an engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---- life cycle -------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        applied_now: list[str] = []
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            parts = path.name.split(".")
            if len(parts) == 3 and parts[1] != self.engine.name:
                continue  # the other engine's half of a pair
            name, script = parts[0], path.read_text()

            async def apply(conn: Conn, name: str = name, script: str = script) -> bool:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(name TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)"
                )
                if await conn.fetchrow("SELECT 1 FROM schema_migrations WHERE name = $1", name):
                    return False
                await conn.run_script(script)
                await conn.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES ($1, now_ms())", name
                )
                return True

            if await run_interaction(self.engine, f"migrate {name}", apply, migration=True):
                applied_now.append(name)
        return applied_now

    async def ping(self) -> None:
        async with self.engine.reader() as conn:
            await conn.fetchrow("SELECT 1")

    async def close(self) -> None:
        await self.engine.close()

    # ---- composing primitives ------------------------------------------------------------------

    async def run_interaction(self, desc: str, fn: Callable[[Transaction], Awaitable[T]]) -> T:
        """Run `fn(txn)` in one write transaction, again on a transient failure.

        `fn` awaits only the primitives of `txn` (see `storage.inbox.Transaction`): on SQLite it
        runs on the writer thread in one go. `desc` names the transaction in the log.
        """

        async def interaction(conn: Conn) -> T:
            return await fn(Transaction(conn))

        return await run_interaction(self.engine, desc, interaction)

    # ---- wake-ups ----------------------------------------------------------------------------

    def subscribe_events(self, page_id: str) -> Subscription:
        """Woken when events of the page row are committed (by any replica, with a listener)."""
        return self.engine.notifier.subscribe(EVENTS, page_id)

    def subscribe_inbox(self) -> Subscription:
        """Woken when pending rows are committed to the webhook inbox (by any replica, with a listener)."""
        return self.engine.notifier.subscribe(INBOX)
