"""Migrations: applied once, in order; concurrent starts (replicas) do not fail."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from storage import open_storage
from tests.helpers import ROOT

# Every migration the project ships, in order (a pair .sqlite.sql/.postgres.sql is one).
ALL = sorted({p.name.split(".")[0] for p in (ROOT / "storage" / "migrations").glob("*.sql")})


async def test_migrate_twice_is_a_noop(db_url: str) -> None:
    storage = await open_storage(db_url)
    try:
        assert ALL[0] == "0001_init"
        assert await storage.migrate() == ALL
        assert await storage.migrate() == []
    finally:
        await storage.close()


async def test_concurrent_migrations_in_one_process(db_url: str) -> None:
    stores = [await open_storage(db_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(s.migrate() for s in stores))
        # Each migration is its own transaction, so which store applies which one is a race; what
        # holds is that every migration is applied exactly once, and each store goes in order.
        assert sorted(name for applied in results for name in applied) == ALL
        assert all(applied == sorted(applied) for applied in results)
    finally:
        for s in stores:
            await s.close()


def test_two_processes_migrating_at_once(db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": db_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "app.py", "migrate"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    joined = "".join(out for out, _ in outputs)
    assert joined.count("applied: " + ", ".join(ALL)) == 1
    assert joined.count("up to date") == 1
