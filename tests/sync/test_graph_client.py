"""GraphClient against respx-mocked Graph responses from fixtures/graph/: paging and every fault."""

from __future__ import annotations

import email.utils
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx

from core.errors import (
    GraphAuthError,
    GraphCursorRejected,
    GraphError,
    GraphRateLimited,
    GraphRequestError,
    GraphUnavailable,
)
from schema.graph import CONVERSATION_FIELDS
from sync.graph_client import MAX_RETRY_AFTER_SECONDS, GraphClient, parse_retry_after
from tests.helpers.sync import FakeTime

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures" / "graph"
BASE_URL = "https://graph.test/v25.0"
PAGE = "104325188712345"
TOKEN = "EAAsecretTOKENvalue123ZDZD"
PATH = f"/{PAGE}/conversations"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def graph(status: int, name: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status,
        content=fixture(name),
        headers={"content-type": "application/json", **(headers or {})},
    )


def ok(name: str = "conversations_page1.json", **headers: str) -> httpx.Response:
    return graph(200, name, {k.replace("_", "-"): v for k, v in headers.items()})


def usage(call_count: float, regain_minutes: float = 0) -> str:
    entry = {
        "type": "messenger",
        "call_count": call_count,
        "total_cputime": 5,
        "total_time": 5,
        "estimated_time_to_regain_access": regain_minutes,
    }
    return json.dumps({PAGE: [entry]})


@asynccontextmanager
async def client(**tunables: Any) -> AsyncIterator[tuple[GraphClient, FakeTime]]:
    fake = FakeTime()
    options: dict[str, Any] = {"max_attempts": 4, "random": lambda: 1.0}
    options.update(tunables)
    async with httpx.AsyncClient(base_url=BASE_URL, timeout=5) as http:
        yield GraphClient(http, sleep=fake.sleep, clock=fake.clock, **options), fake


async def fetch(
    gc: GraphClient,
    fake: FakeTime,
    *,
    after: str | None = None,
    limit: int = 100,
    budget: float = 50.0,
) -> Any:
    return await gc.fetch_conversations(PAGE, TOKEN, after=after, limit=limit, deadline=fake.now + budget)


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_pages_through_the_listing(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.get(PATH).mock(
        side_effect=[ok("conversations_page1.json"), ok("conversations_page2.json")]
    )
    async with client() as (gc, fake):
        first = await fetch(gc, fake, limit=3)
        second = await fetch(gc, fake, after=first.next_cursor, limit=3)
    assert first.records[0].id == "t_10161023456789012"
    assert len(first.records) == 3 and first.skipped == [] and first.limit_used == 3
    page1 = json.loads(fixture("conversations_page1.json"))
    assert first.next_cursor == page1["paging"]["cursors"]["after"]
    assert len(second.records) == 2 and second.next_cursor is None
    assert fake.sleeps == []
    one, two = (call.request for call in route.calls)
    assert one.url.params["platform"] == "messenger"
    assert one.url.params["fields"] == CONVERSATION_FIELDS
    assert one.url.params["limit"] == "3"
    assert "after" not in one.url.params
    assert two.url.params["after"] == first.next_cursor
    for request in (one, two):
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert TOKEN not in str(request.url)
        assert "access_token" not in str(request.url)


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_malformed_record_is_skipped_and_logged(
    respx_mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    respx_mock.get(PATH).mock(return_value=ok("conversations_page_malformed.json"))
    caplog.set_level(logging.WARNING, logger="sync.graph_client")
    async with client() as (gc, fake):
        page = await fetch(gc, fake)
    assert len(page.records) == 2
    assert [path for path, _ in page.skipped] == [
        "$.data[1].messages.data[0].created_time",
        "$.data[2]",
    ]
    assert "$.data[1].messages.data[0].created_time" in caplog.text


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(503, text="<html><body>Service Unavailable</body></html>"),
        httpx.Response(500, json={"unexpected": True}),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("connection refused"),
        httpx.Response(200, text="<html>not json</html>"),
        httpx.Response(200, json={"data": "not a list"}),
        graph(500, "error_2.json"),
        graph(500, "error_1_unknown.json"),
    ],
    ids=[
        "503",
        "500-json",
        "timeout",
        "connect",
        "html-200",
        "bad-shape",
        "code-2",
        "code-1",
    ],
)
async def test_transient_failure_is_retried_after_backoff(failure: Any) -> None:
    with respx.mock(base_url=BASE_URL) as mock:
        route = mock.get(PATH).mock(side_effect=[failure, ok()])
        async with client(backoff_base=0.5) as (gc, fake):
            page = await fetch(gc, fake)
    assert len(page.records) == 3
    assert route.call_count == 2
    assert fake.sleeps == [0.5]  # full jitter with random() == 1.0: the whole first step


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_exhausted_retries_raise_graph_unavailable(
    respx_mock: respx.MockRouter,
) -> None:
    route = respx_mock.get(PATH).mock(return_value=graph(500, "error_2.json"))
    async with client(max_attempts=4, backoff_base=0.5) as (gc, fake):
        with pytest.raises(GraphUnavailable) as caught:
            await fetch(gc, fake)
    assert route.call_count == 4
    assert fake.sleeps == [0.5, 1.0, 2.0]  # exponential
    assert caught.value.graph_code == 2
    assert caught.value.to_json()["code"] == "graph_unavailable"
    assert "An unexpected error has occurred" in caught.value.message


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_jitter_draws_below_the_exponential_cap(
    respx_mock: respx.MockRouter,
) -> None:
    respx_mock.get(PATH).mock(side_effect=[httpx.Response(502), httpx.Response(502), ok()])
    async with client(backoff_base=1.0, random=lambda: 0.25) as (gc, fake):
        await fetch(gc, fake)
    assert fake.sleeps == [0.25, 0.5]


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_backoff_never_sleeps_past_the_deadline(
    respx_mock: respx.MockRouter,
) -> None:
    route = respx_mock.get(PATH).mock(return_value=httpx.Response(503))
    async with client(backoff_base=4.0) as (gc, fake):
        with pytest.raises(GraphUnavailable, match="no time left"):
            await fetch(gc, fake, budget=6.0)
    assert fake.sleeps == [4.0]  # the next wait (8 s) would pass the deadline
    assert route.call_count == 2


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_expired_token_raises_auth_error_without_retry(
    respx_mock: respx.MockRouter,
) -> None:
    route = respx_mock.get(PATH).mock(return_value=graph(400, "error_190.json"))
    async with client() as (gc, fake):
        with pytest.raises(GraphAuthError) as caught:
            await fetch(gc, fake)
    assert route.call_count == 1 and fake.sleeps == []
    assert caught.value.graph_code == 190
    assert "Session has expired" in caught.value.message
    assert "subcode 463" in caught.value.message
    assert caught.value.to_json()["code"] == "graph_auth"


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_rate_limit_waits_what_the_business_usage_header_says(
    respx_mock: respx.MockRouter,
) -> None:
    limited = graph(
        400,
        "error_80006.json",
        {"x-business-use-case-usage": usage(100, regain_minutes=1)},
    )
    respx_mock.get(PATH).mock(side_effect=[limited, ok()])
    async with client(pacing_max_delay=0) as (gc, fake):
        page = await fetch(gc, fake, budget=120)
    assert len(page.records) == 3
    assert fake.sleeps == [60.0]  # 1 minute to regain access


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_rate_limit_past_the_deadline_raises_with_retry_after(
    respx_mock: respx.MockRouter,
) -> None:
    limited = graph(
        400,
        "error_80006.json",
        {"x-business-use-case-usage": usage(100, regain_minutes=5)},
    )
    route = respx_mock.get(PATH).mock(return_value=limited)
    async with client() as (gc, fake):
        with pytest.raises(GraphRateLimited) as caught:
            await fetch(gc, fake, budget=50)
    assert route.call_count == 1 and fake.sleeps == []
    body = caught.value.to_json()
    # retryAfter in camelCase, as the SPEC names times in error bodies.
    assert body["code"] == "graph_rate_limited" and body["retryAfter"] == 300
    assert caught.value.graph_code == 80006


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_app_limit_with_app_usage_header(respx_mock: respx.MockRouter) -> None:
    app_usage = '{"call_count":100,"total_cputime":40,"total_time":38}'
    limited = graph(403, "error_4.json", {"x-app-usage": app_usage})
    respx_mock.get(PATH).mock(side_effect=[limited, ok()])
    async with client(usage_exhausted_wait=30.0, pacing_max_delay=0) as (gc, fake):
        await fetch(gc, fake, budget=40)
    assert fake.sleeps == [30.0]


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_rate_limit_without_headers_backs_off(
    respx_mock: respx.MockRouter,
) -> None:
    respx_mock.get(PATH).mock(side_effect=[httpx.Response(429), graph(400, "error_4.json"), ok()])
    async with client(rate_limit_backoff_base=2.0) as (gc, fake):
        await fetch(gc, fake)
    assert fake.sleeps == [2.0, 4.0]


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_rate_limit_exhausting_attempts_raises_rate_limited(
    respx_mock: respx.MockRouter,
) -> None:
    respx_mock.get(PATH).mock(return_value=graph(400, "error_4.json"))
    async with client(max_attempts=2, rate_limit_backoff_base=1.0) as (gc, fake):
        with pytest.raises(GraphRateLimited) as caught:
            await fetch(gc, fake)
    assert fake.sleeps == [1.0]
    assert caught.value.extra["retryAfter"] == 2


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_reduce_the_amount_of_data_halves_the_limit(
    respx_mock: respx.MockRouter,
) -> None:
    reduce = graph(500, "error_1_reduce_data.json")
    route = respx_mock.get(PATH).mock(side_effect=[reduce, reduce, ok()])
    async with client() as (gc, fake):
        page = await fetch(gc, fake, limit=100)
    assert [call.request.url.params["limit"] for call in route.calls] == [
        "100",
        "50",
        "25",
    ]
    assert page.limit_used == 25
    assert fake.sleeps == []


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_reduce_the_amount_of_data_at_limit_one_is_a_transient_fault(
    respx_mock: respx.MockRouter,
) -> None:
    route = respx_mock.get(PATH).mock(return_value=graph(500, "error_1_reduce_data.json"))
    async with client(max_attempts=3) as (gc, fake):
        with pytest.raises(GraphUnavailable):
            await fetch(gc, fake, limit=2)
    assert [call.request.url.params["limit"] for call in route.calls] == [
        "2",
        "1",
        "1",
        "1",
    ]


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_rejected_cursor(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.get(PATH).mock(return_value=graph(400, "error_100_cursor.json"))
    async with client() as (gc, fake):
        with pytest.raises(GraphCursorRejected) as caught:
            await fetch(gc, fake, after="QVFIUstale")
        assert route.call_count == 1
        # Without a cursor the same error is a plain request error.
        with pytest.raises(GraphRequestError) as plain:
            await fetch(gc, fake)
    assert caught.value.graph_code == 100
    assert not isinstance(plain.value, GraphCursorRejected)
    assert fake.sleeps == []


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_other_code_100_with_a_cursor_is_not_a_cursor_rejection(
    respx_mock: respx.MockRouter,
) -> None:
    respx_mock.get(PATH).mock(return_value=graph(400, "error_100_field.json"))
    async with client() as (gc, fake):
        with pytest.raises(GraphRequestError) as caught:
            await fetch(gc, fake, after="QVFIUcursor")
    assert not isinstance(caught.value, GraphCursorRejected)
    assert "nonexisting field" in caught.value.message


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "name", "code"),
    [(403, "error_10.json", 10), (403, "error_200.json", 200), (404, None, None)],
)
async def test_request_errors_are_not_retried(status: int, name: str | None, code: int | None) -> None:
    response = graph(status, name) if name else httpx.Response(status, text="Not Found")
    with respx.mock(base_url=BASE_URL) as mock:
        route = mock.get(PATH).mock(return_value=response)
        async with client() as (gc, fake):
            with pytest.raises(GraphRequestError) as caught:
                await fetch(gc, fake)
    assert route.call_count == 1 and fake.sleeps == []
    assert caught.value.graph_code == code
    assert caught.value.to_json()["code"] == "graph_request"


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_token_never_reaches_urls_errors_or_logs(
    respx_mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    echo = {
        "error": {
            "message": f"Malformed access token {TOKEN}",
            "type": "OAuthException",
            "code": 190,
            "fbtrace_id": "AbC",
        }
    }
    route = respx_mock.get(PATH).mock(
        side_effect=[
            httpx.ReadTimeout(f"timed out calling {BASE_URL}{PATH}"),
            httpx.Response(503),
            httpx.Response(400, json=echo),
        ]
    )
    caplog.set_level(logging.DEBUG)
    async with client() as (gc, fake):
        with pytest.raises(GraphAuthError) as caught:
            await fetch(gc, fake)
    assert route.call_count == 3
    for call in route.calls:
        assert TOKEN not in str(call.request.url)
        assert call.request.headers["authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(caught.value)
    assert TOKEN not in json.dumps(caught.value.to_json())
    assert "[redacted]" in caught.value.message
    assert caplog.records  # the retries were logged...
    assert TOKEN not in caplog.text  # ...without the token


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_unavailable_error_text_has_no_token(
    respx_mock: respx.MockRouter,
) -> None:
    respx_mock.get(PATH).mock(side_effect=httpx.ConnectTimeout("timed out"))
    async with client(max_attempts=2) as (gc, fake):
        with pytest.raises(GraphUnavailable) as caught:
            await fetch(gc, fake)
    assert "timed out" in caught.value.message
    assert TOKEN not in repr(caught.value) and TOKEN not in str(caught.value.to_json())


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_high_usage_paces_the_next_request(respx_mock: respx.MockRouter) -> None:
    busy = '{"call_count":90,"total_cputime":10,"total_time":10}'
    respx_mock.get(PATH).mock(
        side_effect=[
            ok(x_app_usage=busy),
            ok(x_app_usage=busy),
            ok(x_app_usage="{}"),
            ok(),
        ]
    )
    async with client(pacing_threshold=75, pacing_max_delay=10) as (gc, fake):
        await fetch(gc, fake)
        assert fake.sleeps == []  # nothing known before the first answer
        await fetch(gc, fake)
        assert fake.sleeps == [pytest.approx(6.0)]  # (90 - 75) / 25 of the 10 s maximum
        fake.now += 2.5  # time spent writing counts towards the pause
        await fetch(gc, fake)
        assert fake.sleeps == [pytest.approx(6.0), pytest.approx(3.5)]
        await fetch(gc, fake)  # usage back to 0%: no more pacing
        assert len(fake.sleeps) == 2


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_page_usage_paces_only_that_page_and_never_past_the_deadline(
    respx_mock: respx.MockRouter,
) -> None:
    respx_mock.get(PATH).mock(return_value=ok(x_business_use_case_usage=usage(100)))
    other = respx_mock.get("/999/conversations").mock(return_value=ok())
    async with client(pacing_max_delay=10) as (gc, fake):
        await fetch(gc, fake)
        await gc.fetch_conversations("999", TOKEN, after=None, limit=5, deadline=fake.now + 50)
        assert fake.sleeps == [] and other.call_count == 1
        await fetch(gc, fake, budget=4.0)
    assert fake.sleeps == [pytest.approx(4.0)]  # 10 s asked, 4 s left


# ---- Retry-After: the server's word is the wait -------------------------------------------------

WALL = 1_750_000_000.0  # the wall clock an HTTP-date Retry-After is measured from


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("limited", "waited"),
    [
        (httpx.Response(429, headers={"retry-after": "7"}), 7.0),
        (graph(429, "error_4.json", {"retry-after": "12"}), 12.0),
        (httpx.Response(429, headers={"retry-after": email.utils.formatdate(WALL + 90, usegmt=True)}), 90.0),
        (httpx.Response(503, headers={"retry-after": "3"}), 3.0),
        (httpx.Response(429, headers={"retry-after": "in a while"}), 5.0),  # unreadable: the backoff
    ],
    ids=["429-seconds", "429-graph-body", "429-http-date", "503-seconds", "429-unreadable"],
)
async def test_retry_after_is_the_wait(limited: httpx.Response, waited: float) -> None:
    with respx.mock(base_url=BASE_URL) as mock:
        route = mock.get(PATH).mock(side_effect=[limited, ok()])
        async with client(rate_limit_backoff_base=5.0, backoff_base=0.5, wall_clock=lambda: WALL) as (
            gc,
            fake,
        ):
            page = await fetch(gc, fake, budget=120)
    assert len(page.records) == 3 and route.call_count == 2
    assert fake.sleeps == [waited]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("limited", "error"),
    [
        (httpx.Response(429, headers={"retry-after": "120"}), GraphRateLimited),
        (graph(400, "error_80006.json", {"retry-after": "120"}), GraphRateLimited),
        (httpx.Response(503, headers={"retry-after": "120"}), GraphUnavailable),
    ],
    ids=["429", "code-80006", "503"],
)
async def test_retry_after_past_the_deadline_is_the_502s_retry_after(
    limited: httpx.Response, error: type[GraphError]
) -> None:
    with respx.mock(base_url=BASE_URL) as mock:
        route = mock.get(PATH).mock(return_value=limited)
        async with client() as (gc, fake):
            with pytest.raises(error) as caught:
                await fetch(gc, fake, budget=50)
    assert route.call_count == 1 and fake.sleeps == []  # 120 s would pass the 50 s budget
    body = caught.value.to_json()
    assert body["retryAfter"] == 120 and "no time left" in body["error"]


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("30", 30.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("Wed, 11 Jun 2025 15:08:20 GMT", 0.0),  # in the past: no wait
        (email.utils.formatdate(WALL + 45, usegmt=False), 45.0),
        ("9" * 12, MAX_RETRY_AFTER_SECONDS),
        ("-5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, WALL) == seconds


# ---- paging: the next page's cursor, never the next URL -----------------------------------------


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_next_cursor_comes_from_the_next_urls_query(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.get(PATH).mock(side_effect=[ok("conversations_next_only.json"), ok()])
    async with client() as (gc, fake):
        first = await fetch(gc, fake)
        await fetch(gc, fake, after=first.next_cursor)
    listing = json.loads(fixture("conversations_next_only.json"))
    assert "cursors" not in listing["paging"]
    assert first.next_cursor == parse_qs(urlsplit(listing["paging"]["next"]).query)["after"][0]
    assert first.paging_problem is None
    # The URL itself is never requested: the next request is ours, with only its cursor taken.
    second = route.calls[1].request
    assert second.url.host == "graph.test" and second.url.params["after"] == first.next_cursor
    assert "access_token" not in str(second.url) and second.url.params["fields"] == CONVERSATION_FIELDS


@pytest.mark.asyncio
@respx.mock(base_url=BASE_URL)
async def test_a_next_page_without_a_cursor_is_a_paging_problem(
    respx_mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.graph_client")
    respx_mock.get(PATH).mock(return_value=ok("conversations_next_without_after.json"))
    async with client() as (gc, fake):
        page = await fetch(gc, fake)
    assert page.next_cursor is None and page.paging_problem is not None
    assert "no cursor" in page.paging_problem and len(page.records) == 3
    assert "no cursor" in caplog.text and "access_token" not in caplog.text  # the URL is not logged
