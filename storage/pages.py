"""Pages and the API keys of the users who register them.

A mixin of `SQLStorage` (the same engine). A page row belongs to one user: registering the same
Facebook Page again for that user updates its token; another user's registration is another row.
The token is never part of a page's repr, and never leaves storage except to call Graph.
"""

from __future__ import annotations

import uuid
from typing import Any

from storage.base import Page
from storage.engine import Conn, Store


def page_row(row: Any) -> Page:
    """A facebook_pages row as the stores return it."""
    return Page(
        id=row["id"],
        user_id=row["user_id"],
        facebook_page_id=row["facebook_page_id"],
        name=row["name"],
        token_status=row["token_status"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        access_token=row["access_token"],
    )


class PageStorage(Store):
    """The pages and keys of `storage.base.Storage`."""

    # ---- api keys (created, listed and revoked in keys.py) ---------------------------------------

    async def user_for_key_hash(self, key_hash: str) -> str | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow("SELECT user_id FROM api_keys WHERE key_hash = $1", key_hash)
        return None if row is None else row["user_id"]

    # ---- pages -------------------------------------------------------------------------------

    async def register_page(
        self, user_id: str, facebook_page_id: str, access_token: str, name: str | None
    ) -> tuple[Page, bool]:
        async def register(conn: Conn) -> Any:
            return await conn.fetchrow(
                "INSERT INTO facebook_pages (id, user_id, facebook_page_id, name, access_token) "
                "VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (user_id, facebook_page_id) DO UPDATE SET "
                "access_token = excluded.access_token, "
                "name = COALESCE(excluded.name, facebook_pages.name), "
                "token_status = 'valid', updated_at = now_ms() "
                "RETURNING *, (id = $1) AS created",
                str(uuid.uuid4()),
                user_id,
                facebook_page_id,
                name,
                access_token,
            )

        row = await self._interaction("register_page", register)
        assert row is not None
        return page_row(row), bool(row["created"])

    async def get_page(self, user_id: str, page_id: str) -> Page | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM facebook_pages WHERE id = $1 AND user_id = $2", page_id, user_id
            )
        return None if row is None else page_row(row)

    async def find_page(self, page_id: str) -> Page | None:
        async with self.engine.reader() as conn:
            row = await conn.fetchrow("SELECT * FROM facebook_pages WHERE id = $1", page_id)
        return None if row is None else page_row(row)

    async def mark_token_invalid(self, page_id: str) -> None:
        async def mark(conn: Conn) -> None:
            await conn.execute(
                "UPDATE facebook_pages SET token_status = 'invalid', updated_at = now_ms() WHERE id = $1",
                page_id,
            )

        await self._interaction("mark_token_invalid", mark)
