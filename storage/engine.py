"""What the shared SQL needs from an engine (storage/sqlite.py, postgres.py), its retry rule, and
what a database that cannot be reached looks like to the rest of the service.

Every connection an engine hands out comes from `transaction()`, `reader()`, `autocommit()` or
`migration_transaction()`; each engine classifies a failure there (`is_unavailable`: refused,
reset, restarting, disk full, locked past the busy timeout...) and raises
`core.errors.DatabaseUnavailable` instead, which the app answers 503 `database_unavailable`.
Nothing is cached about the outage: the next request tries again, so the service recovers on
its own when the database is back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

from core.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


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


class Engine(Protocol):
    """What an engine gives the shared SQL."""

    name: str  # migration files ending .{name}.sql are this engine's

    def transaction(self) -> AbstractAsyncContextManager[Conn]:
        """A write transaction (SQLite: BEGIN IMMEDIATE on the one writer)."""

    def reader(self) -> AbstractAsyncContextManager[Conn]:
        """A connection for reads outside any write transaction."""

    def migration_transaction(self) -> AbstractAsyncContextManager[Conn]:
        """A write transaction that also excludes other processes' migrations."""

    def autocommit(self) -> AbstractAsyncContextManager[Conn]:
        """A connection on which each statement commits alone: for writes of one statement."""

    def is_transient(self, exc: Exception) -> bool:
        """Whether a failed transaction may succeed if simply run again (e.g. a deadlock)."""

    def is_unavailable(self, exc: BaseException) -> bool:
        """Whether a failure means the database cannot be reached or cannot work right now."""

    async def close(self) -> None:
        """Close every connection."""


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


# A write transaction that fails transiently (a deadlock on PostgreSQL) is run this many times.
TRANSIENT_ATTEMPTS = 4

_M = TypeVar("_M", bound=Callable[..., Awaitable[Any]])


def retry_transient(method: _M) -> _M:
    """Run a whole write transaction again when the engine says its failure was transient.

    On PostgreSQL two transactions that touch the same conversations in different orders can
    deadlock; the server aborts one, and running it again is the cure. SQLite has none.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(TRANSIENT_ATTEMPTS):
            try:
                return await method(self, *args, **kwargs)
            except Exception as exc:
                if attempt + 1 == TRANSIENT_ATTEMPTS or not self.engine.is_transient(exc):
                    raise
                await asyncio.sleep(random.uniform(0, 0.02 * 2**attempt))
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]
