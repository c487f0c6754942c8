"""The SQLite engine (aiosqlite): zero infrastructure, one file.

WAL mode; one writer connection, every write transaction `BEGIN IMMEDIATE` behind an
asyncio lock (so writers queue in the process, and other processes wait on the busy
timeout); a few reader connections beside it. Shared SQL is translated here: `$n` becomes
`?n`, `now_ms()` becomes the julianday('now') expression, and `FOR UPDATE` is dropped
(the single writer already serializes every write).

An SQLite file does not go away the way a server does: the connections stay open (a deleted file
lives on until they close). What makes it unusable at run time is the disk or the lock: a full disk
or a failing, unmounted or read-only volume, or another process holding the write lock past the
busy timeout. Those raise DatabaseUnavailable (503); reads of a readable file keep working, and the
next transaction simply tries again, so the service recovers when the disk does.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from core.errors import DatabaseUnavailable
from storage.engine import Availability

NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
BUSY_TIMEOUT_MS = 30_000
READERS = 2

# Primary result codes (the low byte of sqlite_errorcode) that mean the file cannot be used right
# now, not that the statement is wrong: busy/locked past the timeout, a read-only file or volume,
# an I/O error, a full disk, a file that cannot be opened, a lock protocol failure.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)

_PARAM = re.compile(r"\$(\d+)")
_FOR_UPDATE = re.compile(r"\s+FOR UPDATE(\s+SKIP LOCKED)?")


def translate(sql: str, _cache: dict[str, str] = {}) -> str:  # noqa: B006 - a deliberate memo
    """Shared SQL -> SQLite SQL."""
    out = _cache.get(sql)
    if out is None:
        out = _FOR_UPDATE.sub("", _PARAM.sub(r"?\1", sql)).replace("now_ms()", NOW_MS)
        _cache[sql] = out
    return out


@functools.lru_cache(maxsize=256)
def _values(width: int, count: int, start: int) -> str:
    """`VALUES ($1, $2), ($3, $4)`: built once per shape, since pages repeat their sizes."""
    groups = ("(" + ", ".join(f"${start + r * width + c}" for c in range(width)) + ")" for r in range(count))
    return "VALUES " + ", ".join(groups)


def split_script(script: str) -> list[str]:
    """A migration script's statements, split where SQLite says a statement is complete."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current)
            current = ""
    if current.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in current.splitlines()
    ):
        raise ValueError("migration script ends inside a statement")
    return statements


class SQLiteConn:
    """A connection as the shared SQL sees it."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self.db.execute(translate(sql), args)
        try:
            return cursor.rowcount
        finally:
            await cursor.close()

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self.db.execute_fetchall(translate(sql), args))

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        rows = list(await self.db.execute_fetchall(translate(sql), args))
        return rows[0] if rows else None

    def rows(self, types: Sequence[str], rows: Sequence[Sequence[Any]], start: int) -> tuple[str, list[Any]]:
        return _values(len(types), len(rows), start), [value for row in rows for value in row]

    def any_of(self, index: int, values: Sequence[Any], type_: str) -> tuple[str, list[Any]]:
        if not values:
            return "IN (NULL)", []
        return "IN (" + ", ".join(f"${index + i}" for i in range(len(values))) + ")", list(values)

    async def run_script(self, script: str) -> None:
        for statement in split_script(script):
            await self.db.execute(statement)


class InlineConn(SQLiteConn):
    """Statements run on the event loop's own thread, in autocommit mode.

    For one-statement writes on the hot path (the webhook inbox): a small INSERT costs less
    than the thread hand-offs aiosqlite needs. If another process holds the write lock,
    the statement goes to the writer's thread instead, so the loop never waits on a lock.
    """

    def __init__(self, inline: sqlite3.Connection, db: aiosqlite.Connection) -> None:
        super().__init__(db)
        self.inline = inline

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            return self.inline.execute(translate(sql), args).rowcount
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
        return await super().execute(sql, *args)


class SQLiteEngine:
    """Owns the writer and reader connections of one database file."""

    name = "sqlite"

    def __init__(
        self, path: str, synchronous: str = "NORMAL", busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._availability = Availability(self.name)
        self._writer: aiosqlite.Connection | None = None
        self._inline: sqlite3.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []

    async def _connect(self, writer: bool) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        self._all.append(db)
        await db.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        await db.execute("PRAGMA foreign_keys = ON")
        if writer:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute(f"PRAGMA synchronous = {self.synchronous}")
        return db

    async def open(self) -> None:
        """Create the file (and its folder) if needed, and open the connections."""
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect(writer=True)
        self._inline = sqlite3.connect(self.path, isolation_level=None)
        self._inline.execute("PRAGMA busy_timeout = 0")  # never block the event loop on a lock
        self._inline.execute(f"PRAGMA synchronous = {self.synchronous}")
        self._inline.execute("PRAGMA foreign_keys = ON")
        # Checkpoints (which may fsync) are left to the writer thread's connection.
        self._inline.execute("PRAGMA wal_autocheckpoint = 0")
        for _ in range(READERS):
            self._readers.put_nowait(await self._connect(writer=False))

    def _open_writer(self) -> aiosqlite.Connection:
        if self._writer is None:  # closed: only a request outliving shutdown gets here
            raise DatabaseUnavailable("The database connection is closed")
        return self._writer

    def _unavailable(self, exc: Exception) -> Exception:
        """`exc`, or DatabaseUnavailable in its place when it is an outage failure."""
        return self._availability.failed(exc) if self.is_unavailable(exc) else exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SQLiteConn]:
        writer = self._open_writer()
        async with self._write_lock:
            try:
                await writer.execute("BEGIN IMMEDIATE")
                try:
                    yield SQLiteConn(writer)
                    await writer.execute("COMMIT")
                except BaseException:
                    # Also after a failed COMMIT (a full disk, say): a writer left inside a
                    # transaction would refuse every BEGIN after it, and never recover.
                    await _rollback(writer)
                    raise
            except Exception as exc:
                error = self._unavailable(exc)
                if error is exc:
                    raise
                raise error from exc
        self._availability.ok()

    # BEGIN IMMEDIATE already excludes every other writer, other processes included.
    migration_transaction = transaction

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[SQLiteConn]:
        writer = self._open_writer()
        assert self._inline is not None, "engine not open"
        async with self._write_lock:
            try:
                yield InlineConn(self._inline, writer)
            except Exception as exc:
                error = self._unavailable(exc)
                if error is exc:
                    raise
                raise error from exc
        self._availability.ok()

    def is_transient(self, exc: Exception) -> bool:
        # One writer and a busy timeout: no deadlocks to retry.
        return False

    def is_unavailable(self, exc: BaseException) -> bool:
        if isinstance(exc, sqlite3.Error):
            return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _UNAVAILABLE_CODES
        return isinstance(exc, OSError)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[SQLiteConn]:
        self._open_writer()
        db = await self._readers.get()
        try:
            yield SQLiteConn(db)
        except Exception as exc:
            error = self._unavailable(exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            self._readers.put_nowait(db)

    async def close(self) -> None:
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        for db in self._all:
            await db.close()
        self._all.clear()
        self._writer = None


async def _rollback(db: aiosqlite.Connection) -> None:
    """End the connection's transaction if one is still open (SQLite ends some itself on error)."""
    if db.in_transaction:
        try:
            await db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original failure is what the caller needs to see
