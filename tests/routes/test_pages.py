"""POST /api/pages: a Page is registered only with a token that belongs to it, on both engines.

Graph's ``/me`` is the `graph_me` stand-in behind the app's own httpx client (tests/helpers
``GraphMe``): it answers the Page (or user) a token belongs to, or, with ``graph_me.answer``, the
failure a test needs. Every refusal is checked to have stored nothing, through the API and in the
database.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

import sync.page_token
from tests.helpers import DEFAULT_PAGE, FIXTURES, GRAPH_URL, GraphMe, auth_headers, page_token

PAGE = DEFAULT_PAGE
OTHER_PAGE = "104325188754321"
PAGES = "/api/pages"


def register(
    client: TestClient, token: str, fb_page_id: str = PAGE, user: str = "alice", **fields: Any
) -> httpx.Response:
    body = {"facebookPageId": fb_page_id, "accessToken": token, **fields}
    return client.post(PAGES, json=body, headers=auth_headers(user))


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = dict(response.json())
    assert body["success"] is False and body["code"] == code and body["error"]
    return body


def stored_pages(client: TestClient) -> list[tuple[str, str, str, str | None]]:
    """(user_id, facebook_page_id, access_token, name) of every row, read in the app's own loop."""
    storage = client.app_state["services"].storage

    async def read() -> list[Any]:
        async with storage.engine.reader() as conn:
            return list(
                await conn.fetch(
                    "SELECT user_id, facebook_page_id, access_token, name FROM facebook_pages ORDER BY id"
                )
            )

    assert client.portal is not None
    rows = client.portal.call(read)
    return [(r["user_id"], r["facebook_page_id"], r["access_token"], r["name"]) for r in rows]


def assert_nothing_stored(client: TestClient) -> None:
    for user in ("alice", "bob"):
        assert client.get(PAGES, headers=auth_headers(user)).json() == {"pages": []}
    assert stored_pages(client) == []


def graph_error(name: str, status: int = 400, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status,
        content=(FIXTURES / "graph" / name).read_bytes(),
        headers={"content-type": "application/json", **(headers or {})},
    )


def error_body(code: int, message: str = "refused", status: int = 400) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"message": message, "type": "OAuthException", "code": code}}
    )


# ---- accepted -------------------------------------------------------------------------------------


def test_the_token_is_verified_with_me_in_the_authorization_header_only(
    client: TestClient, graph_me: GraphMe
) -> None:
    token = page_token(PAGE)
    created = register(client, token, name="Shop")
    assert created.status_code == 201, created.text
    assert (created.json()["facebookPageId"], created.json()["name"]) == (PAGE, "Shop")
    (request,) = graph_me.requests
    assert request.method == "GET"
    assert str(request.url).startswith(f"{GRAPH_URL}/me?")
    assert request.url.params["fields"] == "id,name"
    assert request.headers["authorization"] == f"Bearer {token}"
    assert token not in str(request.url)
    assert stored_pages(client) == [("alice", PAGE, token, "Shop")]


def test_the_name_comes_from_me_when_the_request_gives_none(client: TestClient, graph_me: GraphMe) -> None:
    graph_me.add_page("EAAB-shop-token", PAGE, "Acme Shop")
    created = register(client, "EAAB-shop-token")
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "Acme Shop"
    listed = client.get(PAGES, headers=auth_headers()).json()["pages"]
    assert [p["name"] for p in listed] == ["Acme Shop"]
    assert stored_pages(client) == [("alice", PAGE, "EAAB-shop-token", "Acme Shop")]


def test_a_name_from_graph_is_stored_without_u0000(client: TestClient, graph_me: GraphMe) -> None:
    graph_me.add_page("EAAB-nul-name", PAGE, "Acme\x00 Shop")
    created = register(client, "EAAB-nul-name")
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "Acme Shop"
    assert stored_pages(client)[0][3] == "Acme Shop"


@pytest.mark.parametrize(
    ("fb_page_id", "answer", "status"),
    [
        (PAGE, b'{"id": 104325188712345, "name": "Numeric"}', 201),
        # Past 2**53: the id must be compared exactly, not through a float.
        ("9007199254740993", b'{"id": 9007199254740993}', 201),
        ("9007199254740993", b'{"id": 9007199254740992}', 403),
        (PAGE, b'{"id": "104325188712345"}', 201),
    ],
)
def test_an_id_sent_as_a_json_number_is_compared_exactly(
    client: TestClient, graph_me: GraphMe, fb_page_id: str, answer: bytes, status: int
) -> None:
    graph_me.answer = httpx.Response(200, content=answer, headers={"content-type": "application/json"})
    response = register(client, "EAAB-numeric", fb_page_id)
    assert response.status_code == status, response.text
    if status == 403:
        assert_error(response, 403, "page_token_mismatch")
        assert_nothing_stored(client)
    else:
        assert stored_pages(client) == [
            ("alice", fb_page_id, "EAAB-numeric", "Numeric" if b"Numeric" in answer else None)
        ]


def test_two_users_and_two_pages_each_with_its_own_token(client: TestClient) -> None:
    for user in ("alice", "bob"):
        for fb_page_id in (PAGE, OTHER_PAGE):
            response = register(client, page_token(fb_page_id, user), fb_page_id, user)
            assert response.status_code == 201, response.text
    assert len(stored_pages(client)) == 4
    for user in ("alice", "bob"):
        pages = client.get(PAGES, headers=auth_headers(user)).json()["pages"]
        assert sorted(p["facebookPageId"] for p in pages) == [PAGE, OTHER_PAGE]


# ---- refused: the token is not the page's ---------------------------------------------------------


def test_a_token_of_another_page_is_403_and_nothing_is_stored(client: TestClient) -> None:
    body = assert_error(register(client, page_token(OTHER_PAGE)), 403, "page_token_mismatch")
    assert PAGE in body["error"]
    assert_nothing_stored(client)


def test_a_user_token_is_403_and_nothing_is_stored(client: TestClient, graph_me: GraphMe) -> None:
    graph_me.add_user("EAAB-user-token")
    assert_error(register(client, "EAAB-user-token", name="Claimed"), 403, "page_token_mismatch")
    assert_nothing_stored(client)


def test_graph_code_190_is_400_invalid_token(client: TestClient, graph_me: GraphMe) -> None:
    assert_error(register(client, "unknown-to-graph"), 400, "invalid_token")
    graph_me.answer = graph_error("error_190.json")
    assert_error(register(client, page_token(PAGE)), 400, "invalid_token")
    assert len(graph_me.requests) == 2
    assert_nothing_stored(client)


@pytest.mark.parametrize(
    "token",
    ["EAAB\x00abc", "EAAB abc", "EAAB\tabc", "EAAB\nabc", "EAABé", "EAAB\x7f", "EAAB\u200babc", " "],
)
def test_a_token_that_is_not_printable_ascii_is_400_before_any_call(
    client: TestClient, graph_me: GraphMe, token: str
) -> None:
    body = assert_error(register(client, token), 400, "invalid_token")
    assert "printable ASCII" in body["error"]
    assert graph_me.requests == []
    assert_nothing_stored(client)


@pytest.mark.parametrize(
    "answer",
    [
        graph_error("error_10.json"),
        graph_error("error_200.json", 403),
        error_body(299, "(#299) Requires a permission"),
    ],
)
def test_a_missing_permission_is_400_insufficient_permissions(
    client: TestClient, graph_me: GraphMe, answer: httpx.Response
) -> None:
    graph_me.answer = answer
    assert_error(register(client, page_token(PAGE)), 400, "insufficient_permissions")
    assert_nothing_stored(client)


@pytest.mark.parametrize(
    "answer",
    [
        graph_error("error_4.json", 403),
        graph_error("error_80006.json"),
        error_body(17),
        error_body(32),
        error_body(613),
        error_body(80001),
        httpx.Response(429, text="Too Many Requests"),
    ],
)
def test_a_rate_limit_is_502_graph_rate_limited(
    client: TestClient, graph_me: GraphMe, answer: httpx.Response
) -> None:
    graph_me.answer = answer
    assert_error(register(client, page_token(PAGE)), 502, "graph_rate_limited")
    assert_nothing_stored(client)


def test_a_429_says_when_to_retry(client: TestClient, graph_me: GraphMe) -> None:
    graph_me.answer = httpx.Response(429, text="slow down", headers={"Retry-After": "42"})
    body = assert_error(register(client, page_token(PAGE)), 502, "graph_rate_limited")
    assert body["retryAfter"] == 42
    assert_nothing_stored(client)


async def _hang(request: httpx.Request) -> httpx.Response:
    await asyncio.Event().wait()  # never set: Graph does not answer
    raise AssertionError("unreachable")


async def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def _read_timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500, text="<html>Internal Server Error</html>"),
        httpx.Response(503, json={"error": {"message": "Service temporarily unavailable", "code": 2}}),
        httpx.Response(200, text="not json at all"),
        httpx.Response(200, json={"name": "no id"}),
        httpx.Response(200, json={"id": True}),
        httpx.Response(200, json={"data": []}),
        httpx.Response(404, text="Not Found"),
        httpx.Response(302, headers={"location": "https://elsewhere.test/"}),
        error_body(100, "(#100) Unknown fields: name"),
        _refuse,
        _read_timeout,
        _hang,
    ],
    ids=[
        "500",
        "503-code-2",
        "garbage",
        "no-id",
        "id-bool",
        "listing",
        "404",
        "redirect",
        "code-100",
        "unreachable",
        "read-timeout",
        "hanging",
    ],
)
def test_anything_else_is_502_graph_unavailable(
    client: TestClient, graph_me: GraphMe, monkeypatch: pytest.MonkeyPatch, answer: Any
) -> None:
    # A hanging Graph is abandoned at the bound; a short one keeps the test quick.
    monkeypatch.setattr(sync.page_token, "VERIFY_TIMEOUT_SECONDS", 0.2)
    graph_me.answer = answer
    assert_error(register(client, page_token(PAGE)), 502, "graph_unavailable")
    assert_nothing_stored(client)


# ---- re-registration ------------------------------------------------------------------------------


def test_every_re_registration_is_verified_and_a_refusal_keeps_the_stored_token(
    client: TestClient, graph_me: GraphMe
) -> None:
    first = register(client, page_token(PAGE), name="Shop")
    assert first.status_code == 201, first.text
    original = [("alice", PAGE, page_token(PAGE), "Shop")]

    graph_me.add_user("EAAB-user-token")
    graph_me.answer = None
    refusals = [
        (register(client, page_token(OTHER_PAGE)), 403, "page_token_mismatch"),
        (register(client, "EAAB-user-token"), 403, "page_token_mismatch"),
        (register(client, "unknown-to-graph"), 400, "invalid_token"),
        (register(client, "EAAB bad"), 400, "invalid_token"),
    ]
    for response, status, code in refusals:
        assert_error(response, status, code)
        assert stored_pages(client) == original
    graph_me.answer = httpx.Response(503, text="down")
    assert_error(register(client, page_token(PAGE, "rotated")), 502, "graph_unavailable")
    assert stored_pages(client) == original
    graph_me.answer = None

    # One /me per registration that got past the format check (the spaced token did not).
    assert len(graph_me.requests) == 1 + 3 + 1

    graph_me.add_page("EAAB-rotated", PAGE, "Shop (renamed on Facebook)")
    again = register(client, "EAAB-rotated")
    assert again.status_code == 200, again.text
    assert again.json()["pageId"] == first.json()["pageId"]
    assert stored_pages(client) == [("alice", PAGE, "EAAB-rotated", "Shop (renamed on Facebook)")]
    assert graph_me.requests[-1].headers["authorization"] == "Bearer EAAB-rotated"


def test_another_users_token_cannot_claim_a_registered_page(client: TestClient) -> None:
    assert register(client, page_token(PAGE, "alice")).status_code == 201
    assert_error(register(client, page_token(OTHER_PAGE, "bob"), PAGE, "bob"), 403, "page_token_mismatch")
    assert client.get(PAGES, headers=auth_headers("bob")).json() == {"pages": []}
    assert [row[0] for row in stored_pages(client)] == ["alice"]


# ---- bad input: 400, never a 500, never stripped ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"facebookPageId": "1043\x00251", "accessToken": "EAAB-x"}, "validation_error"),
        ({"facebookPageId": PAGE, "accessToken": "EAAB-x", "name": "Sh\x00op"}, "validation_error"),
        ({"facebookPageId": PAGE, "accessToken": "EAAB-x", "name": "\x00"}, "validation_error"),
        ({"facebookPageId": PAGE, "accessToken": "EAAB-\x00"}, "invalid_token"),
        ({"facebookPageId": PAGE, "accessToken": "x" * 4097}, "validation_error"),
        ({"facebookPageId": PAGE, "accessToken": "EAAB-x", "name": "n" * 513}, "validation_error"),
    ],
)
def test_u0000_and_oversized_fields_are_400_and_nothing_is_stored(
    client: TestClient, graph_me: GraphMe, body: dict[str, Any], code: str
) -> None:
    response = client.post(PAGES, json=body, headers=auth_headers())
    assert_error(response, 400, code)
    assert graph_me.requests == []
    assert_nothing_stored(client)


# ---- the token never shows ------------------------------------------------------------------------


def test_the_token_is_in_no_response_body_and_no_log(
    client: TestClient, graph_me: GraphMe, caplog: pytest.LogCaptureFixture
) -> None:
    # The service logs at INFO (app.py); our own modules and httpx (which logs each request's URL)
    # are watched down to DEBUG. (aiosqlite's DEBUG lines echo SQL parameters: not enabled there.)
    caplog.set_level(logging.INFO)
    for name in ("routes", "sync", "storage", "httpx", "messenger_sync"):
        caplog.set_level(logging.DEBUG, logger=name)
    token = "EAAB-very-secret-token-0123456789"
    responses = []
    graph_me.answer = error_body(190, f"Malformed access token {token}")
    responses.append(assert_error(register(client, token), 400, "invalid_token"))
    assert "[redacted]" in responses[-1]["error"]
    graph_me.answer = error_body(2, f"Unexpected error for {token}", status=500)
    responses.append(assert_error(register(client, token), 502, "graph_unavailable"))
    graph_me.answer = error_body(200, f"{token} lacks pages_messaging")
    responses.append(assert_error(register(client, token), 400, "insufficient_permissions"))
    graph_me.answer = None
    responses.append(assert_error(register(client, token, OTHER_PAGE), 403, "page_token_mismatch"))
    created = register(client, token, name="Shop")
    assert created.status_code == 201
    listed = client.get(PAGES, headers=auth_headers())
    # Last: code 4 holds the whole app in the rate-limit pool, so every later Graph call waits.
    graph_me.answer = error_body(4, f"Rate limited: {token}")
    responses.append(assert_error(register(client, token), 502, "graph_rate_limited"))
    texts = [str(r) for r in responses] + [created.text, listed.text]
    assert all(token not in text for text in texts)
    assert "not registered" in caplog.text  # the refusals were logged...
    assert token not in caplog.text  # ...without the token
    for record in caplog.records:
        assert token not in record.getMessage()
