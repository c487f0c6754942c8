"""The benchmark Graph stand-in: what it serves decodes with the schema, and pages to the end."""

from __future__ import annotations

import time

import httpx
import pytest

from bench.graph_standin import create_standin, decode_cursor, encode_cursor
from core.errors import GraphCursorRejected
from sync.graph_client import GraphClient
from sync.graph_records import conversation_to_record

PAGE = "104325188712345"


@pytest.mark.asyncio
async def test_standin_pages_through_every_conversation_newest_first() -> None:
    app = create_standin(230, PAGE, messages_per_conversation=4)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://standin/v25.0"
    ) as http:
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
