"""The SQLite engine: zero infrastructure, one file.

WAL mode; one writer connection owned by one thread (datasette's write thread): a whole write
transaction, `BEGIN IMMEDIATE` to `COMMIT`, is one job on that thread, so a transaction costs one
hand-off between the event loop and the thread, whatever its number of statements. Writers queue
in the process; other processes wait on the busy timeout, on the writer thread, never on the
event loop. A few reader connections (aiosqlite) sit beside it.

The transaction functions are the shared `async def fn(conn)` of both engines: here `conn` is a
`SyncConn`, whose coroutines call sqlite3 directly and never suspend, so the writer thread drives
the whole coroutine with one `send(None)` (`drive`). Shared SQL is translated here: `$n` becomes
`?n`, `now_ms()` becomes the julianday('now') expression, and `FOR UPDATE` is dropped (the
single writer already serializes every write).

An SQLite file does not go away the way a server does: the connections stay open (a deleted file
lives on until they close). What makes it unusable at run time is the disk or the lock: a full disk
or a failing, unmounted or read-only volume, or another process holding the write lock past the
busy timeout. Those raise DatabaseUnavailable (503); reads of a readable file keep working, and the
next transaction simply tries again, so the service recovers when the disk does.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from core.errors import DatabaseUnavailable
from storage.engine import Availability, TxnFn
from storage.notify import Notifier

T = TypeVar("T")

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


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end, on the calling thread.

    A transaction function awaits only its connection's methods; on a `SyncConn` those return
    without suspending, so one `send(None)` runs the whole function. A coroutine that does
    suspend (it awaited something else) is closed and refused.
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a transaction function may await only its connection's methods")


class SyncConn:
    """The writer's connection as the shared SQL sees it, on the writer thread: its coroutines call
    sqlite3 directly and never suspend (see `drive`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.notes: set[tuple[str, str]] = set()

    async def execute(self, sql: str, *args: Any) -> int:
        return self.db.execute(translate(sql), args).rowcount

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return self.db.execute(translate(sql), args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        return self.db.execute(translate(sql), args).fetchone()

    def rows(self, types: Sequence[str], rows: Sequence[Sequence[Any]], start: int) -> tuple[str, list[Any]]:
        return _values(len(types), len(rows), start), [value for row in rows for value in row]

    def any_of(self, index: int, values: Sequence[Any], type_: str) -> tuple[str, list[Any]]:
        if not values:
            return "IN (NULL)", []
        return "IN (" + ", ".join(f"${index + i}" for i in range(len(values))) + ")", list(values)

    async def run_script(self, script: str) -> None:
        for statement in split_script(script):
            self.db.execute(statement)

    async def sleep(self, seconds: float) -> None:
        # On the writer thread (driven by `drive`, never on the loop): the transaction holds the
        # write lock anyway, so nothing else could run meanwhile.
        time.sleep(seconds)  # noqa: ASYNC251

    def notify(self, channel: str, key: str = "") -> None:
        self.notes.add((channel, key))


class ReaderConn:
    """A reader connection (aiosqlite: each statement one hand-off to its thread)."""

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

    rows = SyncConn.rows
    any_of = SyncConn.any_of

    async def run_script(self, script: str) -> None:
        raise RuntimeError("a reader connection runs no migration")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def notify(self, channel: str, key: str = "") -> None:
        raise RuntimeError("a reader connection commits nothing to notify about")


_Job = tuple[Callable[[sqlite3.Connection], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class WriterThread:
    """The one thread that owns the writer connection and runs jobs on it, in order."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._opened: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Start the thread and open its connection (raises what opening raised)."""
        loop = asyncio.get_running_loop()
        self._opened = loop.create_future()
        self._thread.start()
        await self._opened

    async def submit(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job(connection)` on the thread; its result or its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((job, loop, future))
        return await future

    async def stop(self) -> None:
        """Finish the queued jobs, close the connection, end the thread."""
        if self._thread.is_alive():
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        opened = self._opened
        assert opened is not None
        try:
            db = self._connect()
        except BaseException as exc:
            _settle(opened.get_loop(), opened, None, exc)
            return
        _settle(opened.get_loop(), opened, None, None)
        try:
            while (item := self._jobs.get()) is not None:
                job, loop, future = item
                try:
                    result = job(db)
                except BaseException as exc:  # handed to the caller, whatever it is
                    _settle(loop, future, None, exc)
                else:
                    _settle(loop, future, result, None)
        finally:
            db.close()


def _settle(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: BaseException | None
) -> None:
    """Resolve a caller's future from the writer thread (a caller that gave up is left alone)."""

    def settle() -> None:
        if future.cancelled():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _rollback(db: sqlite3.Connection) -> None:
    """End the connection's transaction if one is still open (SQLite ends some itself on error)."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original failure is what the caller needs to see


class SQLiteEngine:
    """Owns the writer thread and the reader connections of one database file."""

    name = "sqlite"

    def __init__(
        self, path: str, synchronous: str = "NORMAL", busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self.notifier = Notifier()
        self._availability = Availability(self.name)
        self._writer: WriterThread | None = None
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []

    def _connect_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        return db

    async def _connect_reader(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        self._all.append(db)
        await db.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        await db.execute("PRAGMA foreign_keys = ON")
        return db

    async def open(self) -> None:
        """Create the file (and its folder) if needed, and open the connections."""
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        writer = WriterThread(self._connect_writer)
        await writer.start()  # first: it turns WAL on before anyone else opens the file
        self._writer = writer
        for _ in range(READERS):
            self._readers.put_nowait(await self._connect_reader())

    def _open_writer(self) -> WriterThread:
        if self._writer is None:  # closed: only a request outliving shutdown gets here
            raise DatabaseUnavailable("The database connection is closed")
        return self._writer

    def _unavailable(self, exc: Exception) -> Exception:
        """`exc`, or DatabaseUnavailable in its place when it is an outage failure."""
        return self._availability.failed(exc) if self.is_unavailable(exc) else exc

    async def transact(self, fn: TxnFn[T], *, single_statement: bool = False, migration: bool = False) -> T:
        # BEGIN IMMEDIATE already excludes every other writer, other processes' migrations included.
        # Every write, the webhook inbox's one-statement insert included, is a job of the writer
        # thread: measured against running that insert on the event loop's thread (bench/webhook.py),
        # the hand-off per group commit made no difference, and nothing fsyncs on the loop.
        writer = self._open_writer()

        def job(db: sqlite3.Connection) -> tuple[T, set[tuple[str, str]]]:
            conn = SyncConn(db)
            if single_statement:
                return drive(fn(conn)), conn.notes
            db.execute("BEGIN IMMEDIATE")
            try:
                result = drive(fn(conn))
                db.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (a full disk, say): a writer left inside a
                # transaction would refuse every BEGIN after it, and never recover.
                _rollback(db)
                raise
            return result, conn.notes

        try:
            result, notes = await writer.submit(job)
        except Exception as exc:
            error = self._unavailable(exc)
            if error is exc:
                raise
            raise error from exc
        self._availability.ok()
        self.notifier.publish_all(notes)
        return result

    def is_transient(self, exc: Exception) -> bool:
        # One writer and a busy timeout: no deadlocks to retry.
        return False

    def is_unavailable(self, exc: BaseException) -> bool:
        if isinstance(exc, sqlite3.Error):
            return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _UNAVAILABLE_CODES
        return isinstance(exc, OSError)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[ReaderConn]:
        self._open_writer()
        db = await self._readers.get()
        try:
            yield ReaderConn(db)
        except Exception as exc:
            error = self._unavailable(exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            self._readers.put_nowait(db)

    async def close(self) -> None:
        for db in self._all:
            await db.close()
        self._all.clear()
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.stop()
