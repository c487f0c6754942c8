"""The SQLite engine (aiosqlite): zero infrastructure, one file.

WAL mode; one writer connection, every write transaction `BEGIN IMMEDIATE` behind an
asyncio lock (so writers queue in the process, and other processes wait on the busy
timeout); a few reader connections beside it. Shared SQL is translated here: `$n` becomes
`?n`, `now_ms()` becomes the julianday('now') expression, and `FOR UPDATE` is dropped
(the single writer already serializes every write).
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

NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
BUSY_TIMEOUT_MS = 30_000
READERS = 2

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

    def __init__(self, path: str, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.synchronous = synchronous
        self._writer: aiosqlite.Connection | None = None
        self._inline: sqlite3.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []

    async def _connect(self, writer: bool) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        self._all.append(db)
        await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SQLiteConn]:
        assert self._writer is not None, "engine not open"
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield SQLiteConn(self._writer)
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            else:
                await self._writer.execute("COMMIT")

    # BEGIN IMMEDIATE already excludes every other writer, other processes included.
    migration_transaction = transaction

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[SQLiteConn]:
        assert self._writer is not None and self._inline is not None, "engine not open"
        async with self._write_lock:
            yield InlineConn(self._inline, self._writer)

    def is_transient(self, exc: Exception) -> bool:
        # One writer and a busy timeout: no deadlocks to retry.
        return False

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[SQLiteConn]:
        db = await self._readers.get()
        try:
            yield SQLiteConn(db)
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
