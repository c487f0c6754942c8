"""A database clock the test sets: every `now_ms()` the storage runs reads it, on both engines.

Storage takes every time decision (lease expiry, takeover, `updated_at`, inbox `received_at`) from
SQL `now_ms()`, never from Python. To make those decisions testable without sleeping, the test owns
that clock, without any hook in the service:

* PostgreSQL: `now_ms()` is a SQL function created by migration 0001 in the test's own schema (the
  `db_url` fixture puts only that schema on the `search_path`). After migrating, it is replaced, in
  that same schema and qualified with it, by one that reads a one-row table `test_clock`; a column
  DEFAULT of `now_ms()` refers to the function by oid, which CREATE OR REPLACE keeps, so defaults
  follow the clock as well. `set()` updates the row.
* SQLite: the engine writes `now_ms()` as `CAST((julianday('now') - 2440587.5) * 86400000 AS
  INTEGER)` (storage/sqlite.py NOW_MS; the migrations' DEFAULTs and the `active_syncs` view spell
  the same). SQLite lets an application function override a built-in one, so every connection of a
  `ClockedSQLiteEngine` (the writer and the readers) gets a `julianday` that answers the Julian day
  of the test's clock, chosen so that the expression above yields exactly the clock's millisecond.

`test_storage_state_machine.py::test_clock_is_honoured` fails if either engine ever reads the real
clock instead (it sets the clock decades away from the wall clock and checks exact values).
"""

from __future__ import annotations

import math
import sqlite3
from urllib.parse import urlsplit

import aiosqlite
import asyncpg

from storage import Storage
from storage.sql import SQLStorage
from storage.sqlite import SQLiteEngine

_UNIX_EPOCH_JD = 2440587.5
_MS_PER_DAY = 86_400_000


def julian_day(ms: int) -> float:
    """The Julian day that SQLite's `CAST((jd - 2440587.5) * 86400000 AS INTEGER)` turns into `ms`."""
    jd = _UNIX_EPOCH_JD + ms / _MS_PER_DAY
    # Near 2.46e6 a double has about 4e-5 ms of resolution: step to a value that truncates to ms.
    while int((jd - _UNIX_EPOCH_JD) * _MS_PER_DAY) < ms:
        jd = math.nextafter(jd, math.inf)
    while int((jd - _UNIX_EPOCH_JD) * _MS_PER_DAY) > ms:
        jd = math.nextafter(jd, -math.inf)
    return jd


class DbClock:
    """The clock of one test database; `open_storage()` opens storages whose `now_ms()` reads it."""

    def __init__(self, url: str, start_ms: int) -> None:
        self.url = url
        self.now = start_ms
        self._pg: asyncpg.Connection | None = None
        self._table = "test_clock"  # schema-qualified once the PostgreSQL clock is installed

    @property
    def engine(self) -> str:
        return "sqlite" if urlsplit(self.url).scheme == "sqlite" else "postgres"

    async def open_storage(self) -> Storage:
        """A migrated storage on the clock's database, reading this clock (open several: replicas)."""
        if self.engine == "sqlite":
            path = self.url[len("sqlite:///") :]
            engine = ClockedSQLiteEngine(path, self)
            await engine.open()
            storage = SQLStorage(engine)
            await storage.migrate()
            return storage
        from storage import open_storage

        storage = await open_storage(self.url)
        await storage.migrate()
        if self._pg is None:  # after the migrations: 0001 creates the real now_ms()
            # No prepared statements: behind a transaction pooler they would not outlive a transaction.
            self._pg = await asyncpg.connect(self.url, statement_cache_size=0)
            schema = await self._pg.fetchval("SELECT current_schema()")
            assert schema, "the test database has no schema on its search_path"
            self._table = f'"{schema}".test_clock'
            await self._pg.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} (ms BIGINT NOT NULL); "
                f"DELETE FROM {self._table}; "
                f"INSERT INTO {self._table} (ms) VALUES ({int(self.now)}); "
                f'CREATE OR REPLACE FUNCTION "{schema}".now_ms() RETURNS BIGINT LANGUAGE sql VOLATILE '
                f"AS $$ SELECT ms FROM {self._table} $$"
            )
        return storage

    async def set(self, ms: int) -> None:
        """Move the database clock to `ms` (either way: the storage must not care how it got there)."""
        self.now = ms
        if self._pg is not None:
            await self._pg.execute(f"UPDATE {self._table} SET ms = $1", ms)

    async def advance(self, ms: int) -> None:
        """Move the database clock forward by `ms`."""
        await self.set(self.now + ms)

    async def close(self) -> None:
        """Close the clock's own connection (the storages are closed by whoever opened them)."""
        conn, self._pg = self._pg, None
        if conn is not None:
            await conn.close()

    def julianday(self, arg: str) -> float:
        """SQLite's `julianday('now')` on the test's clock; any other use is a defect of the test."""
        if arg != "now":
            raise ValueError(f"the test clock answers julianday('now') only, not {arg!r}")
        return julian_day(self.now)


class ClockedSQLiteEngine(SQLiteEngine):
    """The SQLite engine with `julianday('now')` (hence `now_ms()`) read from a `DbClock`."""

    def __init__(self, path: str, clock: DbClock) -> None:
        super().__init__(path)
        self.clock = clock

    def _connect_writer(self) -> sqlite3.Connection:
        db = super()._connect_writer()
        db.create_function("julianday", 1, self.clock.julianday)
        return db

    async def _connect_reader(self) -> aiosqlite.Connection:
        db = await super()._connect_reader()
        await db.create_function("julianday", 1, self.clock.julianday)
        return db
