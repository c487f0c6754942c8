"""API keys stored in the database (`python app.py api-keys create|list|revoke`).

A mixin of `SQLStorage` (the same engine, the portable SQL of storage/engine.py's Conn). Only
the SHA-256 of a key is stored (routes/auth.py hashes); a key is shown once, when it is created.
Revoking deletes the row: every replica asks the database for each request's key (no cache), so a
revoked key answers 401 at once everywhere. `last_used_at` is written at most once a minute per
key (the UPDATE is conditional on the stored time), never on every request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.engine import Conn, Store

_COLUMNS = "id, user_id, created_at, last_used_at"


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """A stored API key, without its hash."""

    id: int
    user_id: str
    created_at: int
    last_used_at: int | None


class KeyStorage(Store):
    """The API-key half of `storage.base.Storage` (each write one transaction function)."""

    async def create_api_key(self, user_id: str, key_hash: str) -> ApiKeyRow:
        """Store a hashed key for a user; returns its row (its id is what `revoke` takes)."""

        async def create(conn: Conn) -> Any:
            return await conn.fetchrow(
                f"INSERT INTO api_keys (user_id, key_hash) VALUES ($1, $2) RETURNING {_COLUMNS}",
                user_id,
                key_hash,
            )

        row = await self._interaction("create_api_key", create)
        assert row is not None
        return _key(row)

    async def list_api_keys(self) -> list[ApiKeyRow]:
        """Every stored key, oldest first."""
        async with self.engine.reader() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM api_keys ORDER BY id")
        return [_key(r) for r in rows]

    async def revoke_api_key(self, key_id: int) -> ApiKeyRow | None:
        """Delete a stored key; the row it was, or None if there is no such key."""

        async def revoke(conn: Conn) -> Any:
            return await conn.fetchrow(f"DELETE FROM api_keys WHERE id = $1 RETURNING {_COLUMNS}", key_id)

        row = await self._interaction("revoke_api_key", revoke)
        return None if row is None else _key(row)

    async def touch_api_key(self, key_hash: str, every_ms: int = 60_000) -> bool:
        """Record that a key was used now, unless that was recorded less than `every_ms` ago."""

        async def touch(conn: Conn) -> int:
            return await conn.execute(
                "UPDATE api_keys SET last_used_at = now_ms() "
                "WHERE key_hash = $1 AND (last_used_at IS NULL OR last_used_at <= now_ms() - $2)",
                key_hash,
                every_ms,
            )

        return await self._interaction("touch_api_key", touch) == 1


def _key(row: Any) -> ApiKeyRow:
    last_used = row["last_used_at"]
    return ApiKeyRow(
        id=int(row["id"]),
        user_id=row["user_id"],
        created_at=int(row["created_at"]),
        last_used_at=None if last_used is None else int(last_used),
    )
