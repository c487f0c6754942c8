"""The engines' transaction entry point: one retry rule for every write, and SQLite's writer
thread running each whole transaction (one hand-off per transaction)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from storage import Storage, open_storage
from storage.base import InboxBody
from storage.engine import TRANSIENT_ATTEMPTS, Conn, run_interaction
from storage.sql import SQLStorage
from storage.sqlite import SQLiteEngine, SyncConn
from tests.helpers.storage import page_ids_of


class Flaky(Exception):
    """A failure the test declares transient (as a deadlock is on PostgreSQL)."""


def engine_of(storage: Storage) -> Any:
    return storage.engine  # type: ignore[attr-defined]


async def count_pages(storage: Storage) -> int:
    async with engine_of(storage).reader() as conn:
        row = await conn.fetchrow("SELECT count(*) AS n FROM facebook_pages")
    return int(row["n"])


def insert_page(page_id: str) -> Any:
    async def insert(conn: Conn) -> None:
        await conn.execute(
            "INSERT INTO facebook_pages (id, user_id, facebook_page_id, access_token) "
            "VALUES ($1, 'alice', $1, 'EAAB-token')",
            page_id,
        )

    return insert


async def test_a_transient_failure_runs_the_whole_transaction_again(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(storage)
    monkeypatch.setattr(engine, "is_transient", lambda exc: isinstance(exc, Flaky))
    attempts = 0

    async def twice_unlucky(conn: Conn) -> str:
        nonlocal attempts
        attempts += 1
        await insert_page(f"page-{attempts}")(conn)  # written, then rolled back with the failure
        if attempts < 3:
            raise Flaky("deadlock detected")
        return "done"

    assert await run_interaction(engine, "twice_unlucky", twice_unlucky) == "done"
    assert attempts == 3
    assert await count_pages(storage) == 1  # only the last attempt's row


async def test_other_failures_and_the_last_attempt_are_not_run_again(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(storage)
    monkeypatch.setattr(engine, "is_transient", lambda exc: isinstance(exc, Flaky))
    calls: list[str] = []

    async def broken(conn: Conn) -> None:
        calls.append("broken")
        raise ValueError("a bug, not a deadlock")

    async def always_flaky(conn: Conn) -> None:
        calls.append("flaky")
        raise Flaky("deadlock detected")

    with pytest.raises(ValueError):
        await run_interaction(engine, "broken", broken)
    with pytest.raises(Flaky):
        await run_interaction(engine, "always_flaky", always_flaky)
    assert calls == ["broken"] + ["flaky"] * TRANSIENT_ATTEMPTS


async def test_every_store_write_goes_through_the_retry_rule(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule is the default: a store method (here register_page) retries without asking."""
    engine = engine_of(storage)
    monkeypatch.setattr(engine, "is_transient", lambda exc: isinstance(exc, Flaky))
    transact = engine.transact
    failures = [Flaky("serialization failure")]

    async def first_one_fails(fn: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await transact(fn, **kwargs)

    monkeypatch.setattr(engine, "transact", first_one_fails)
    page, created = await storage.register_page("alice", "104325188712345", "EAAB-token", None)
    assert created and failures == []
    assert await page_ids_of(storage, "alice") == [page.id]


@pytest.mark.postgres_only
async def test_a_real_deadlock_between_replicas_is_resolved_by_running_one_again(
    storage: Storage, db_url: str
) -> None:
    """Two replicas lock two rows in opposite orders: PostgreSQL aborts one, which runs again."""
    for page_id in ("a", "b"):
        await run_interaction(engine_of(storage), "insert", insert_page(page_id))
    other = await open_storage(db_url)
    both_hold_one = asyncio.Barrier(2)
    attempts = {"ab": 0, "ba": 0}

    def lock_in_order(first: str, second: str) -> Any:
        async def lock(conn: Conn) -> None:
            attempts[first + second] += 1
            await conn.execute("UPDATE facebook_pages SET name = $1 WHERE id = $2", first + second, first)
            if attempts[first + second] == 1:
                # Only PostgreSQL's connections may wait on something else: this test makes the
                # deadlock certain (a transaction function of the service never does this).
                await asyncio.wait_for(both_hold_one.wait(), 10)
            await conn.execute("UPDATE facebook_pages SET name = $1 WHERE id = $2", first + second, second)

        return lock

    try:
        await asyncio.gather(
            run_interaction(engine_of(storage), "ab", lock_in_order("a", "b")),
            run_interaction(engine_of(other), "ba", lock_in_order("b", "a")),
        )
    finally:
        await other.close()
    assert sorted(attempts.values()) == [1, 2]  # the deadlock's victim ran once more, and committed
    async with engine_of(storage).reader() as conn:
        names = {r["name"] for r in await conn.fetch("SELECT name FROM facebook_pages")}
    assert len(names) == 1  # the second to commit wrote both rows


# ---- SQLite: the writer thread --------------------------------------------------------------------


async def open_sqlite(tmp_path: Path) -> Storage:
    storage = await open_storage(f"sqlite:///{tmp_path}/writer.db")
    await storage.migrate()
    return storage


async def test_sqlite_runs_a_whole_transaction_on_its_writer_thread(tmp_path: Path) -> None:
    storage = await open_sqlite(tmp_path)
    try:
        seen: list[str] = []

        async def several_statements(conn: Conn) -> int:
            for i in range(3):
                seen.append(threading.current_thread().name)
                await insert_page(f"page-{i}")(conn)
            seen.append(threading.current_thread().name)
            return await conn.execute("UPDATE facebook_pages SET name = 'x'")

        assert await run_interaction(engine_of(storage), "several", several_statements) == 3
        assert set(seen) == {"sqlite-writer"} and threading.current_thread().name != "sqlite-writer"
        assert await count_pages(storage) == 3
    finally:
        await storage.close()


async def test_sqlite_refuses_a_transaction_function_that_awaits_something_else(tmp_path: Path) -> None:
    storage = await open_sqlite(tmp_path)
    try:

        async def waits_on_the_loop(conn: Conn) -> None:
            await insert_page("page-1")(conn)
            await asyncio.sleep(0)  # would stall the writer thread on the event loop

        with pytest.raises(RuntimeError, match="may await only its connection"):
            await run_interaction(engine_of(storage), "waits", waits_on_the_loop)
        assert await count_pages(storage) == 0  # rolled back
        await run_interaction(engine_of(storage), "after", insert_page("page-2"))  # still usable
        assert await count_pages(storage) == 1
    finally:
        await storage.close()


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_sqlite_inbox_insert_runs_on_the_writer_thread(
    tmp_path: Path, synchronous: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webhook's hot path too: with FULL each commit is an fsync, never on the event loop."""
    engine = SQLiteEngine(str(tmp_path / "inbox.db"), synchronous=synchronous)
    await engine.open()
    storage = SQLStorage(engine)
    try:
        await storage.migrate()
        threads: list[str] = []
        execute = SyncConn.execute

        async def recorded(self: SyncConn, sql: str, *args: Any) -> int:
            threads.append(threading.current_thread().name)
            return await execute(self, sql, *args)

        monkeypatch.setattr(SyncConn, "execute", recorded)
        await storage.record_webhook_batch([InboxBody(b"{}", hashlib.sha256(b"{}").hexdigest())])
        assert threads == ["sqlite-writer"]
        assert await storage.webhook_status_counts() == {"pending": 1}
    finally:
        await storage.close()
