"""Storage: one interface (`storage.base.Storage`), two engines, chosen by the URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from storage.base import Storage
from storage.sql import SQLStorage


async def open_storage(
    url: str,
    *,
    sqlite_synchronous: str = "NORMAL",
    direct_url: str | None = None,
    statement_cache: bool = False,
) -> Storage:
    """Open the engine the URL names (`sqlite:///path` or `postgresql://...`).

    PostgreSQL only: `direct_url` (DATABASE_DIRECT_URL) is a connection that bypasses any
    transaction pooler, used to LISTEN for other replicas' commits (without it, they are found by
    polling); `statement_cache` (DATABASE_STATEMENT_CACHE) lets asyncpg keep prepared statements,
    which only a direct `url` allows.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from storage.sqlite import SQLiteEngine

        path = url[len("sqlite://") :]
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel, sqlite:////abs
        if not path:
            raise ValueError("sqlite URL needs a path: sqlite:///./data/messenger.db")
        sqlite_engine = SQLiteEngine(path, synchronous=sqlite_synchronous)
        await sqlite_engine.open()
        return SQLStorage(sqlite_engine)
    if scheme in ("postgresql", "postgres"):
        from storage.postgres import PostgresEngine

        pg_engine = PostgresEngine(url, direct_dsn=direct_url, statement_cache=statement_cache)
        await pg_engine.open()
        return SQLStorage(pg_engine)
    raise ValueError(f"Unsupported database URL scheme: {scheme!r}")


__all__ = ["Storage", "open_storage"]
