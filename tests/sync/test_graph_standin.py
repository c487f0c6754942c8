"""The benchmark Graph stand-in: what it serves decodes with the schema, pages to the end, and its
/me verifies a registration as Graph's does."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from bench.graph_standin import create_standin, decode_cursor, encode_cursor
from core.errors import GraphCursorRejected, InvalidToken, PageTokenMismatch
from sync.graph_client import GraphClient
from sync.graph_records import conversation_to_record
from sync.page_token import PageIdentity, verify_page_token
from tests.helpers import ROOT

PAGE = "104325188712345"


@pytest.mark.asyncio
async def test_standin_pages_through_every_conversation_newest_first() -> None:
    app = create_standin(230, PAGE, messages_per_conversation=4)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://standin/v25.0") as http:
        graph = GraphClient(http)
        after: str | None = None
        ids: list[str] = []
        times: list[int] = []
        pages = 0
        while True:
            page = await graph.fetch_conversations(
                PAGE, "token", after=after, limit=100, deadline=time.monotonic() + 30
            )
            pages += 1
            assert page.skipped == []
            for conv in page.records:
                record = conversation_to_record(conv, PAGE)
                assert record is not None and len(record.events) == 4
                assert {e.event_type for e in record.events} == {
                    "message_received",
                    "message_sent",
                }
            ids += [c.id for c in page.records]
            times += [c.updated_time_ms for c in page.records]
            after = page.next_cursor
            if after is None:
                break
        with pytest.raises(GraphCursorRejected):
            await graph.fetch_conversations(
                PAGE,
                "token",
                after="not-a-cursor",
                limit=10,
                deadline=time.monotonic() + 5,
            )
    assert pages == 3
    assert len(ids) == len(set(ids)) == 230
    assert times == sorted(times, reverse=True)


def test_cursor_round_trip() -> None:
    assert decode_cursor(encode_cursor(12345)) == 12345
    assert decode_cursor("garbage!") is None


@pytest.mark.parametrize("base_url", ["http://standin/v25.0", "http://standin"])
async def test_me_answers_the_page_for_any_token_by_default(base_url: str) -> None:
    app = create_standin(10, PAGE, page_name="Bench Shop")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as http:
        identity = await verify_page_token(http, PAGE, "EAAB-anything")
        # Another page id with a token the stand-in accepts: /me answers the stand-in's page.
        with pytest.raises(PageTokenMismatch):
            await verify_page_token(http, "104325188799999", "EAAB-anything")
        raw = await http.get("/me", params={"fields": "id"}, headers={"Authorization": "Bearer x"})
    assert identity == PageIdentity(facebook_page_id=PAGE, name="Bench Shop")
    assert raw.json() == {"id": PAGE}


async def test_with_tokens_only_those_are_the_pages() -> None:
    app = create_standin(10, PAGE, tokens=frozenset({"EAAB-one", "EAAB-two"}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://standin/v25.0") as http:
        assert (await verify_page_token(http, PAGE, "EAAB-two")).facebook_page_id == PAGE
        with pytest.raises(InvalidToken):
            await verify_page_token(http, PAGE, "EAAB-three")
        listing = await http.get(f"/{PAGE}/conversations", headers={"Authorization": "Bearer EAAB-three"})
        allowed = await http.get(f"/{PAGE}/conversations", headers={"Authorization": "Bearer EAAB-one"})
        anonymous = await http.get("/me")
    assert listing.status_code == 400 and listing.json()["error"]["code"] == 190
    assert allowed.status_code == 200 and len(allowed.json()["data"]) == 10
    assert anonymous.status_code == 400 and anonymous.json()["error"]["code"] == 104


def test_the_command_line_describes_its_options_and_prints_its_url() -> None:
    script = str(ROOT / "bench" / "graph_standin.py")
    shown = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for option in ("--port", "--page-id", "--page-name", "--tokens", "--conversations", "/me"):
        assert option in shown
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, script, "--port", str(port), "--tokens", "EAAB-cli"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            url = f"http://127.0.0.1:{port}/v25.0"
            assert f"GRAPH_API_URL={url}" in first
            for _ in range(200):  # a bound for a failing test: uvicorn binds just after the print
                try:
                    answer = httpx.get(f"{url}/me", headers={"Authorization": "Bearer EAAB-cli"}, timeout=5)
                    break
                except httpx.ConnectError:
                    time.sleep(0.05)
            else:
                raise AssertionError("the stand-in did not start listening")
            refused = httpx.get(f"{url}/me", headers={"Authorization": "Bearer EAAB-other"}, timeout=5)
        finally:
            proc.terminate()
    assert refused.status_code == 400 and refused.json()["error"]["code"] == 190
    assert answer.json() == {"id": PAGE, "name": "Stand-in Page"}
