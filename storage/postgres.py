"""The PostgreSQL engine (asyncpg pool): production, several replicas on one database.

Shared SQL runs as written (`now_ms()` is a function the first migration creates); bulk
row sources are one JSON array of rows (`unnest()` over typed arrays where a column is
binary), so a statement's text does not change with its number of rows and asyncpg's
prepared statement cache keeps working.

A server that cannot be reached (refused, reset, restarting, failed over to a read-only standby,
out of connections or disk) raises DatabaseUnavailable from whichever connection hit it; the pool
replaces dead connections on the next acquire, so nothing needs restarting when the server is back.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
import msgspec

from core.errors import DatabaseUnavailable
from storage.engine import Availability

# pg_advisory_xact_lock key that serializes migrations across processes.
MIGRATION_LOCK_KEY = 0x6D73796E63  # "msync"
# A connection attempt that hangs (a host gone without a word) is given up after this long, so a
# request answers 503 in seconds instead of waiting on the kernel's TCP timeout.
CONNECT_TIMEOUT_SECONDS = 5.0

# What a server that went away, is restarting, or cannot take work right now raises.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS, TLS, and timeouts (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,  # class 08: the connection failed or was lost mid-operation
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.AdminShutdownError,  # 57P01: terminated by a restart or pg_terminate_backend
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed, the server is resetting
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full, out of memory
    asyncpg.ReadOnlySQLTransactionError,  # 25006: a write reached a standby after a failover
)


_json_encode = msgspec.json.Encoder().encode


@functools.lru_cache(maxsize=64)
def _json_source(types: tuple[str, ...], index: int) -> str:
    """`SELECT (r->>0)::bigint, ... FROM jsonb_array_elements($n)`: rows as JSON arrays."""
    columns = ", ".join(f"(r->>{i})::{t}" for i, t in enumerate(types))
    return f"SELECT {columns} FROM jsonb_array_elements(${index}::jsonb) AS r"


def _rowcount(status: str) -> int:
    """asyncpg's command tag ("UPDATE 3", "INSERT 0 1") -> 3, 1."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _is_closed(conn: Any) -> bool:
    """Whether a pooled connection has died (the pool detaches a connection that closes)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # detached from its proxy: the pool took it back, closed
        return True


class PostgresConn:
    """A pooled connection as the shared SQL sees it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self.conn.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self.conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        return await self.conn.fetchrow(sql, *args)

    def rows(self, types: Sequence[str], rows: Sequence[Sequence[Any]], start: int) -> tuple[str, list[Any]]:
        # One JSON document, encoded in one C call: typed arrays cost asyncpg a Python-level
        # isinstance check per value, which dominated the write path's CPU. JSON cannot carry
        # bytes, so a binary column keeps the arrays.
        if "bytea" not in types:
            return _json_source(tuple(types), start), [_json_encode(rows).decode()]
        columns = [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in types]
        arrays = ", ".join(f"${start + i}::{t}[]" for i, t in enumerate(types))
        return f"SELECT * FROM unnest({arrays})", columns

    def any_of(self, index: int, values: Sequence[Any], type_: str) -> tuple[str, list[Any]]:
        return f"= ANY(${index}::{type_}[])", [list(values)]

    async def run_script(self, script: str) -> None:
        await self.conn.execute(script)


class PostgresEngine:
    """Owns the asyncpg pool."""

    name = "postgres"

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._availability = Availability(self.name)

    async def open(self) -> None:
        """Open the pool (fails fast if the server cannot be reached)."""
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            command_timeout=60,
            timeout=CONNECT_TIMEOUT_SECONDS,
        )

    @asynccontextmanager
    async def _connection(self, transaction: bool) -> AsyncIterator[PostgresConn]:
        """A pooled connection (in a transaction if asked); outage failures -> DatabaseUnavailable."""
        pool = self._pool
        if pool is None:  # closed: only a request outliving shutdown gets here
            raise DatabaseUnavailable("The database connection is closed")
        lost = False
        try:
            async with pool.acquire() as conn:
                try:
                    if transaction:
                        async with conn.transaction():
                            yield PostgresConn(conn)
                    else:
                        yield PostgresConn(conn)
                except Exception:
                    # Whatever asyncpg called it (a terminated session can surface as an
                    # InternalClientError, or as "released back to the pool" once the pool has
                    # taken back the dead connection), a failure on a connection that is now
                    # closed is the server going away, not the statement.
                    lost = _is_closed(conn)
                    raise
        except Exception as exc:
            if not (lost or self.is_unavailable(exc)):
                raise
            # The other idle connections probably died with this one: have the pool replace them
            # all on their next acquire instead of failing one request per dead connection.
            await pool.expire_connections()
            raise self._availability.failed(exc) from exc
        self._availability.ok()

    def transaction(self) -> AbstractAsyncContextManager[PostgresConn]:
        return self._connection(transaction=True)

    @asynccontextmanager
    async def migration_transaction(self) -> AsyncIterator[PostgresConn]:
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            yield conn

    def is_transient(self, exc: Exception) -> bool:
        return isinstance(exc, asyncpg.DeadlockDetectedError | asyncpg.SerializationError)

    def is_unavailable(self, exc: BaseException) -> bool:
        if isinstance(exc, _UNAVAILABLE):
            return True
        # asyncpg's own words for a connection that is already gone, or a pool shutting down.
        return isinstance(exc, asyncpg.InterfaceError) and (
            "connection is closed" in str(exc) or "pool is clos" in str(exc)
        )

    def autocommit(self) -> AbstractAsyncContextManager[PostgresConn]:
        # Outside a transaction block every statement is its own transaction: one round trip.
        return self._connection(transaction=False)

    def reader(self) -> AbstractAsyncContextManager[PostgresConn]:
        return self._connection(transaction=False)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
