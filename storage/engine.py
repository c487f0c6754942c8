"""What the shared SQL needs from an engine (storage/sqlite.py, postgres.py), the one retry rule,
and what a database that cannot be reached looks like to the rest of the service.

Every write is a transaction function, `async def fn(conn)`, handed to `run_interaction(engine,
desc, fn)` (synapse's `runInteraction`): the engine runs the whole function in one transaction
(SQLite: on its writer thread, one hand-off per transaction) and `run_interaction` runs it again
when the engine calls the failure transient (a deadlock, a serialization failure). A transaction
function awaits nothing but its connection's methods, so it runs the same on both engines.

Reads take a connection from `reader()`. Each engine classifies a failure (`is_unavailable`:
refused, reset, restarting, disk full, locked past the busy timeout...) and raises
`core.errors.DatabaseUnavailable` instead, which the app answers 503 `database_unavailable`.
Nothing is cached about the outage: the next request tries again, so the service recovers on
its own when the database is back.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

from core.errors import DatabaseUnavailable
from storage.notify import Notifier

log = logging.getLogger(__name__)

T = TypeVar("T")


class Conn(Protocol):
    """A connection as the shared SQL sees it (inside a transaction for writes)."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; returns the number of rows it touched."""

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Rows, each indexable by position and by column name."""

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        """The first row, or None."""

    def rows(self, types: Sequence[str], rows: Sequence[Sequence[Any]], start: int) -> tuple[str, list[Any]]:
        """A row source for INSERT or a CTE: SQL text and its arguments, numbered from `start`."""

    def any_of(self, index: int, values: Sequence[Any], type_: str) -> tuple[str, list[Any]]:
        """`= ANY(...)` / `IN (...)`: SQL text (after a column) and its arguments, from `index`."""

    async def run_script(self, script: str) -> None:
        """Run a migration script (several statements) inside the current transaction."""

    async def sleep(self, seconds: float) -> None:
        """Wait inside the transaction (SQLite: on the writer thread, which holds the write lock)."""

    def notify(self, channel: str, key: str = "") -> None:
        """Wake `channel` subscribers (of `key`) in every process once this transaction commits."""


# A transaction function: the whole body of one write transaction (an `async def`).
TxnFn = Callable[[Conn], Coroutine[Any, Any, T]]


class Engine(Protocol):
    """What an engine gives the shared SQL."""

    name: str  # migration files ending .{name}.sql are this engine's
    notifier: Notifier  # this process' subscribers; the engine publishes what its commits notify

    async def transact(self, fn: TxnFn[T], *, single_statement: bool = False, migration: bool = False) -> T:
        """Run `fn` in one write transaction, once; `run_interaction` is the caller.

        `single_statement`: `fn` runs one statement, which may commit on its own (no BEGIN/COMMIT
        around it). `migration`: the transaction also excludes other processes' migrations.
        """

    def reader(self) -> AbstractAsyncContextManager[Conn]:
        """A connection for reads outside any write transaction."""

    def is_transient(self, exc: Exception) -> bool:
        """Whether a failed transaction may succeed if simply run again (e.g. a deadlock)."""

    def is_unavailable(self, exc: BaseException) -> bool:
        """Whether a failure means the database cannot be reached or cannot work right now."""

    async def close(self) -> None:
        """Close every connection."""


# A write transaction that fails transiently (a deadlock on PostgreSQL) is run this many times.
TRANSIENT_ATTEMPTS = 4
# Before running it again, wait a random time up to this, doubled at each attempt: two
# transactions that deadlocked once should not meet again at once.
TRANSIENT_BACKOFF_SECONDS = 0.02


async def run_interaction(
    engine: Engine, desc: str, fn: TxnFn[T], *, single_statement: bool = False, migration: bool = False
) -> T:
    """Run a write transaction, again when its failure was transient: every write goes through here.

    On PostgreSQL two transactions that touch the same rows in different orders can deadlock, and
    the server aborts one; under SERIALIZABLE a transaction can lose a race. Running the whole
    function again is the cure (its statements were rolled back). SQLite's one writer has neither.
    `desc` names the transaction in the log.
    """
    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        try:
            return await engine.transact(fn, single_statement=single_statement, migration=migration)
        except Exception as exc:
            if attempt == TRANSIENT_ATTEMPTS or not engine.is_transient(exc):
                raise
            log.info("transaction %s failed transiently (%s); running it again", desc, type(exc).__name__)
            await asyncio.sleep(random.uniform(0, TRANSIENT_BACKOFF_SECONDS * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")


class Store:
    """What every storage mixin has: the engine, and its one way to write."""

    engine: Engine

    async def _interaction(self, desc: str, fn: TxnFn[T], *, single_statement: bool = False) -> T:
        """`run_interaction` on this store's engine."""
        return await run_interaction(self.engine, desc, fn, single_statement=single_statement)


class Availability:
    """Turns an engine's outage failures into DatabaseUnavailable, logging the outage once.

    A request during an outage fails fast with 503; the log says when the database went away
    and when it came back, not once per request.
    """

    def __init__(self, engine_name: str) -> None:
        self.engine_name = engine_name
        self.down = False

    def failed(self, exc: BaseException) -> DatabaseUnavailable:
        """The error to raise for an outage failure `exc` (its message names no host or secret)."""
        if not self.down:
            self.down = True
            log.warning("%s database unavailable: %s: %s", self.engine_name, type(exc).__name__, exc)
        return DatabaseUnavailable("The database is unavailable; retry later")

    def ok(self) -> None:
        """A connection worked: log the recovery if there was an outage."""
        if self.down:
            self.down = False
            log.warning("%s database reachable again", self.engine_name)
