"""The PostgreSQL engine (asyncpg pool): production, several replicas on one database.

Shared SQL runs as written (`now_ms()` is a function the first migration creates); bulk
row sources are one JSON array of rows (`unnest()` over typed arrays where a column is
binary), so a statement's text does not change with its number of rows and asyncpg's
prepared statement cache keeps working.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec

# pg_advisory_xact_lock key that serializes migrations across processes.
MIGRATION_LOCK_KEY = 0x6D73796E63  # "msync"


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

    async def open(self) -> None:
        """Open the pool (fails fast if the server cannot be reached)."""
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=self.min_size, max_size=self.max_size, command_timeout=60
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresConn]:
        assert self._pool is not None, "engine not open"
        async with self._pool.acquire() as conn, conn.transaction():
            yield PostgresConn(conn)

    @asynccontextmanager
    async def migration_transaction(self) -> AsyncIterator[PostgresConn]:
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            yield conn

    def is_transient(self, exc: Exception) -> bool:
        return isinstance(exc, asyncpg.DeadlockDetectedError | asyncpg.SerializationError)

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[PostgresConn]:
        # Outside a transaction block every statement is its own transaction: one round trip.
        assert self._pool is not None, "engine not open"
        async with self._pool.acquire() as conn:
            yield PostgresConn(conn)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[PostgresConn]:
        assert self._pool is not None, "engine not open"
        async with self._pool.acquire() as conn:
            yield PostgresConn(conn)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
