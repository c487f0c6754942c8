"""The crash test, short mode (issue 11, item 1): the service as real processes, syncing a page set
from the Graph stand-in while signed webhooks arrive, killed with SIGKILL three times at random
moments and restarted on the same database; after each kill and at the end every invariant of
tests/helpers/crash.py holds. The long mode is `python bench/crash.py --kills 20`.

SQLite runs the default deployment (`python app.py serve` does everything); PostgreSQL the split one
(`python app.py serve` with BACKGROUND_WORK=off and `python app.py worker`), each kill hitting the
API, the worker or both. The seed is printed, and is in every failure: CRASH_SEED=N replays it.

A second test shows that each check can fail: it breaks a database in the ways the checks look for.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

from storage import Storage
from tests.helpers.crash import (
    Body,
    Checker,
    CrashConfig,
    CrashReport,
    HeldLock,
    Item,
    reading,
    run_crash,
    takeovers,
)
from tests.helpers.webhook import message_body

SEED = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(1, 1_000_000))


async def test_kill_9_at_random_moments_loses_nothing_and_duplicates_nothing(
    db_url: str, engine: str, tmp_path: Path
) -> None:
    print(f"CRASH_SEED={SEED}")
    topology = "single" if engine == "sqlite" else "split"
    config = CrashConfig(db_url, engine, tmp_path / "crash", SEED, kills=3, topology=topology)
    report = await run_crash(config)
    context = f"CRASH_SEED={SEED} ({engine}/{topology})\n{report.summary()}"
    assert not report.violations, "\n".join([context, *report.violations, report.log_tails()])
    # The run proved something: it killed mid-backfill, saw locks taken over, and webhooks got in.
    assert len(report.kills) == 3, context
    assert report.kills_mid_backfill >= 1 and report.takeovers >= 1, context
    assert report.acked > 0 and report.acked_found == report.acked, context


FB = "108000000000000"
CONTACT = "7712345678901234"


def body(n: int) -> Body:
    raw = message_body(f"m_check{n}", "hi", 1_764_000_000_000 + n, sender=CONTACT, page=FB)
    return Body(raw, hashlib.sha256(raw).hexdigest(), FB, (Item(f"m_check{n}", CONTACT, "message_received"),))


async def test_each_check_fails_on_a_database_broken_its_way(
    storage: Storage, db_url: str, tmp_path: Path
) -> None:
    page, _ = await storage.register_page("crash", FB, "EAAB-crash-token", "Checked")
    engine: Any = storage.engine  # type: ignore[attr-defined]

    async def sql(*statements: tuple[str, tuple[Any, ...]]) -> None:
        async def run(conn: Any) -> None:
            for statement, args in statements:
                await conn.execute(statement, *args)

        await engine.transact(run)

    inbox = "INSERT INTO webhook_events (body, body_sha256, status) VALUES ($1, $2, $3)"
    event = (
        "INSERT INTO contact_interaction_events (conversation_id, page_id, event_type, message_id, "
        "event_timestamp) VALUES ((SELECT id FROM messenger_conversations WHERE sender_id = $1), $2, "
        "'message_received', $3, 1)"
    )
    state = (
        "INSERT INTO sync_state (page_id, user_id, sync_session_id, last_cursor) "
        "VALUES ($1, 'crash', 's1', $2) "
        "ON CONFLICT (page_id) DO UPDATE SET last_cursor = excluded.last_cursor"
    )
    one, two, three = body(1), body(2), body(3)
    await sql(
        (inbox, (one.raw, one.sha256, "applied")),
        ("INSERT INTO messenger_conversations (page_id, sender_id) VALUES ($1, $2)", (page.id, CONTACT)),
        (event, (CONTACT, page.id, "m_check1")),
        (state, (page.id, "b2Zmc2V0OjUw")),  # the stand-in's cursor "offset:50"
    )
    config = CrashConfig(db_url, "check", tmp_path, seed=0, pages=1)
    report = CrashReport(config)
    checker = Checker(config, report)

    async def check(acked: list[Body]) -> list[str]:
        before = len(report.violations)
        async with reading(db_url) as db:
            await checker.observe(db, acked, "check")
        return report.violations[before:]

    assert await check([one]) == []  # a consistent database: nothing to report

    found = await check([one, two])  # acknowledged, never stored
    assert any("1 acknowledged bodies are not in the inbox (e.g. m_check2)" in v for v in found), found

    await sql((inbox, (two.raw, two.sha256, "applied")), (inbox, (three.raw, three.sha256, "invalid")))
    found = await check([one, two, three])  # marked applied without its events; a row invalid
    assert any("m_check2 of an applied inbox row is not in contact_interaction_events" in v for v in found), (
        found
    )
    assert any("is invalid" in v for v in found), found

    await sql(("INSERT INTO messenger_conversations (page_id, sender_id) VALUES ($1, '77000')", (page.id,)))
    found = await check([one])  # a conversation written without its events
    assert any("1 conversations without events" in v for v in found), found

    await sql((state, (page.id, "b2Zmc2V0OjIw")))  # back to "offset:20" in the same session
    found = await check([one])
    assert any("cursor went from offset 50 back to 20" in v for v in found), found

    await sql(
        ("DROP INDEX idx_unique_event_by_message", ()),  # what would let a duplicate in
        (event, (CONTACT, page.id, "m_check1")),
    )
    found = await check([one])
    assert any("mids stored more than once in a page" in v for v in found), found
    assert any("events sharing (conversation, type, mid)" in v for v in found), found

    # A lock taken over before the killed holder's lease ran out (the database's clock says when).
    await sql(
        (
            "INSERT INTO sync_locks (page_id, locked_by, locked_at, expires_at, fencing_token) "
            "VALUES ($1, 'host:1:new', 1000, 3000, 8)",
            (page.id,),
        )
    )
    before = len(report.violations)
    seen = await takeovers(config, report, [HeldLock(page.id, 7, 2000, True)], 0.0, "check")
    assert seen[0] == 1 and any(
        "taken over 1000 ms before it expired" in v for v in report.violations[before:]
    )
    before = len(report.violations)
    await takeovers(config, report, [HeldLock(page.id, 7, 1000, True)], 0.0, "check")  # at expiry: fine
    assert report.violations[before:] == []
