"""`python app.py sync PAGE_ID` (sync_command.run_sync_command): resumes until done, clear errors.

It runs on the storage the CLI opened and its own httpx client (through the rate-limit pool); the
`graph` router mocks httpx for the whole process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import respx

from core.settings import Settings
from storage import Storage
from sync.command import run_sync_command
from tests.helpers.sync import (
    PAGE_FB_ID,
    WALK,
    FakeGraph,
    after_cursor,
    assert_seed_checks,
    chain,
    graph_response,
)


@pytest.fixture(autouse=True)
async def seed_checks_hold_afterwards(storage: Storage) -> AsyncIterator[None]:
    """The seed's checks hold after every test here, whatever it did."""
    yield
    await assert_seed_checks(storage)


async def test_command_resumes_until_done(
    settings: Settings, graph: respx.MockRouter, storage: Storage, capsys: pytest.CaptureFixture[str]
) -> None:
    page, _ = await storage.register_page("alice", PAGE_FB_ID, "EAAB-token", "Acme")
    fake = FakeGraph(graph, chain(*WALK))
    # A budget so small that every request returns after one page: the command must resume.
    tight = replace(settings, sync_time_budget_seconds=0.000001)
    assert await run_sync_command(tight, storage, page.id, None) == 0
    err = capsys.readouterr().err
    assert "synced 12 conversations" in err and "done in 4 request(s)" in err and "inserted 12" in err
    assert fake.calls == [None, *(after_cursor(name) for name in WALK[:3])]
    state = await storage.get_sync_state(page.id)
    assert state is not None and state.is_complete and await storage.current_lock(page.id) is None
    await assert_seed_checks(storage)


async def test_command_reports_graph_auth_and_a_held_lock(
    settings: Settings, graph: respx.MockRouter, storage: Storage, capsys: pytest.CaptureFixture[str]
) -> None:
    page, _ = await storage.register_page("alice", PAGE_FB_ID, "EAAB-token", "Acme")
    FakeGraph(graph, {None: [graph_response(400, "error_190.json")]})
    assert await run_sync_command(settings, storage, page.id, "full") == 1
    assert "graph_auth" in capsys.readouterr().err
    await storage.register_page("alice", PAGE_FB_ID, "EAAB-new-token", None)
    lease = await storage.acquire_sync_lock(page.id, "elsewhere", 30)
    assert lease is not None
    assert await run_sync_command(settings, storage, page.id, None) == 1
    assert "another sync of this page is running" in capsys.readouterr().err
    assert await storage.current_lock(page.id) == lease  # left alone


async def test_command_refuses_an_unknown_page(
    settings: Settings, graph: respx.MockRouter, storage: Storage, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_sync_command(settings, storage, "no-such-page", None) == 2
    assert "no page with pageId no-such-page" in capsys.readouterr().err
    assert not graph.calls
