"""Fuzzing every route with hypothesis: whatever arrives, no 500, and every error in the SPEC's
shape `{"success": false, "error": str, "code": str}`, on both engines.

The app runs under a real uvicorn (the production options) in a thread, so requests cross real
HTTP, an event stream can be opened and left, and nothing in the test client smooths a request
over. Each example is one request to a route of the app (taken from the app's own route table,
so a route added later is fuzzed too) or to a path that is not one: path ids, query strings,
headers and bodies drawn from values that broke the service before (digits that are not ASCII,
integers beyond 64 bits, U+0000, JSON nested thousands deep, cursors we never made, signatures
right and wrong), with valid keys and ids often enough to get past authentication and lookups.
A correctly signed webhook body of at most 1 MiB, whatever it holds, must be acknowledged 200.

Bounded for CI: a fixed number of examples per engine, derandomized (the same examples on every
run), no example database, no deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.routing import BaseRoute, Mount, Route

from app import create_app
from core.records import ConversationRecord, EventRecord
from core.settings import Settings
from storage import Storage
from tests.helpers import APP_SECRET, KEYS, VERIFY_TOKEN, GraphMe, graph_router, graph_transport, page_token
from tests.helpers.storage import write_conversations
from webhook.signature import sign

EXAMPLES = 200  # per engine
PAGE = "104325188712345"
OTHER_PAGE = "104325188799999"
BODY_LIMIT = 1024 * 1024


@dataclass
class Ids:
    """Rows that exist, so that examples get past lookups."""

    pages: list[str] = field(default_factory=list)
    conversations: list[int] = field(default_factory=list)
    events: list[int] = field(default_factory=list)


@dataclass
class Req:
    """One request as drawn: the route, its path ids, query, headers and body."""

    method: str
    template: str
    path_values: list[str]
    query: list[tuple[str, str]]
    headers: dict[str, bytes]
    body: bytes | None
    sign_body: bool = False


def endpoints(routes: list[BaseRoute], prefix: str = "") -> list[tuple[str, str]]:
    """(method, path template) of every route, mounted ones included."""
    out: list[tuple[str, str]] = []
    for route in routes:
        if isinstance(route, Route):
            out += [(m, prefix + route.path) for m in sorted(route.methods or ["GET"]) if m != "HEAD"]
        elif isinstance(route, Mount):
            if route.routes:
                out += endpoints(list(route.routes), prefix + route.path)
            else:
                out.append(("GET", prefix + route.path + "/{path}"))
    return out


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


OVERFLOWING_CURSOR = _cursor(b"[18446744073709551616, 1]")  # 2**64 does not fit a BIGINT
# Values that broke the service once, or might: the fuzz mixes them with random ones.
HOSTILE = [
    "",
    "0",
    "-1",
    "1",
    "١٢",  # Arabic-Indic digits: isdigit() is true
    "²",  # superscript two: isdigit() is true, int() refuses it
    "9" * 19,
    "9" * 30,
    "18446744073709551616",
    "\x00",
    "a\x00b",
    "1\x00",
    " 1 ",
    "1e3",
    "0x10",
    "../../etc/passwd",
    "%00",
    "null",
    "true",
    "[]",
    "{}",
    "\u202e",
    "🙂",
    "x" * 600,
    OVERFLOWING_CURSOR,
    _cursor(b"[1, -9223372036854775809]"),
    _cursor(b"[" * 2000),
    _cursor(b'["a", "b"]'),
    _cursor(b"[1, 2, 3]"),
    "!!!not-base64!!!",
    "incremental",
    "full",
    "subscribe",
]


def hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40), st.integers().map(str))


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        hostile_text(),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )


KNOWN_KEYS = [
    "facebookPageId",
    "accessToken",
    "name",
    "pageId",
    "resumeSession",
    "maxDurationMs",
    "mode",
    "object",
    "entry",
    "statuses",
]
QUERY_KEYS = [
    "pageId",
    "limit",
    "cursor",
    "lastEventId",
    "minutes",
    "hub.mode",
    "hub.verify_token",
    "hub.challenge",
]


def plausible_body(template: str, ids: Ids) -> dict[str, Any] | None:
    """A body the route accepts (the fuzz then spoils one field of it, or not)."""
    if template == "/api/pages":
        return {"facebookPageId": PAGE, "accessToken": page_token(PAGE, "alice"), "name": "Shop"}
    if template.startswith("/api/conversations/sync"):
        return {"pageId": ids.pages[0], "facebookPageId": PAGE, "maxDurationMs": 2000}
    if template == "/api/webhook":
        item = {
            "sender": {"id": "7712345678901234"},
            "recipient": {"id": PAGE},
            "timestamp": 1_732_900_000_000,
            "message": {"mid": "m_fuzz", "text": "hi"},
        }
        return {"object": "page", "entry": [{"id": PAGE, "time": 1, "messaging": [item]}]}
    return None


def ids_for(name: str, ids: Ids) -> list[str]:
    """Real ids of the kind a path parameter names."""
    if "page" in name:
        return list(ids.pages)
    if "conversation" in name:
        return [str(i) for i in ids.conversations]
    return [*ids.pages, *map(str, ids.conversations), *map(str, ids.events)]


def plausible(method: str, template: str, ids: Ids) -> Req:
    """The request a client of the API would send to the route: alice's key, real ids, a valid body."""
    path_values = [ids_for(name, ids)[0] for name in re.findall(r"\{(\w+)[^}]*\}", template)]
    query = [("pageId", ids.pages[0])]
    if template == "/api/webhook" and method == "GET":
        query = [
            ("hub.mode", "subscribe"),
            ("hub.verify_token", VERIFY_TOKEN),
            ("hub.challenge", "1158201444"),
        ]
    headers = {"authorization": f"Bearer {KEYS['alice']}".encode(), "content-type": b"application/json"}
    values = plausible_body(template, ids)
    body = None if values is None else json.dumps(values).encode()
    return Req(method, template, path_values, query, headers, body, sign_body=True)


@st.composite
def requests(draw: st.DrawFn, routes: list[tuple[str, str]], ids: Ids) -> Req:
    """A request to one of `routes` (or somewhere else): half of them well-formed but for at most one
    hostile value (so they reach the code behind the key and the lookups), the rest anything."""
    real_ids = st.sampled_from([*ids.pages, *map(str, ids.conversations), *map(str, ids.events)])
    if draw(st.integers(0, 19)) == 0:  # now and then, a route that does not exist
        method, template = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"])), "/api/{x}"
    else:
        method, template = draw(st.sampled_from(routes))
    names = re.findall(r"\{(\w+)[^}]*\}", template)
    if draw(st.booleans()):  # well-formed, as a client of the API sends it, but for one thing
        req = plausible(method, template, ids)
        values = None if req.body is None else json.loads(req.body)
        spoil = draw(st.sampled_from(["nothing", "path", "query", "body", "header"]))
        if spoil == "path" and req.path_values:
            req.path_values[draw(st.integers(0, len(req.path_values) - 1))] = draw(
                hostile_text().filter(bool)
            )
        elif spoil == "query":
            req.query.append((draw(st.sampled_from(QUERY_KEYS)), draw(hostile_text())))
        elif spoil == "body" and values:
            values[draw(st.sampled_from(sorted(values)))] = draw(json_values())
            req.body = json.dumps(values).encode()
        elif spoil == "header":
            req.headers["last-event-id"] = (
                draw(hostile_text()).encode("utf-8", "replace").translate(_PRINTABLE)
            )
        return req

    headers: dict[str, bytes] = {}
    path_values = [draw(st.one_of(real_ids, hostile_text().filter(bool))) for _ in names]
    query = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(QUERY_KEYS), st.text(max_size=8)),
                st.one_of(real_ids, hostile_text()),
            ),
            max_size=4,
        )
    )
    auth = draw(st.sampled_from(["alice", "bob", "none", "wrong", "basic", "empty", "odd"]))
    if auth in KEYS:
        headers["authorization"] = f"Bearer {KEYS[auth]}".encode()
    elif auth != "none":
        headers["authorization"] = {
            "wrong": b"Bearer nope",
            "basic": b"Basic a2V5",
            "empty": b"Bearer ",
            "odd": draw(st.binary(max_size=30)).translate(_PRINTABLE),
        }[auth]
    if draw(st.booleans()):
        headers["last-event-id"] = draw(hostile_text()).encode("utf-8", "replace").translate(_PRINTABLE)
    if draw(st.booleans()):
        headers["content-type"] = draw(
            st.sampled_from([b"application/json", b"text/plain", b"application/x-www-form-urlencoded", b""])
        )
    kind = draw(st.sampled_from(["none", "object", "known", "json", "bytes", "deep", "big"]))
    body: bytes | None
    if kind == "none":
        body = None
    elif kind == "known":  # the fields our bodies have, with anything in them
        keys = draw(st.lists(st.sampled_from(KNOWN_KEYS), unique=True, max_size=6))
        body = json.dumps({key: draw(st.one_of(real_ids, json_values())) for key in keys}).encode()
    elif kind == "object":
        body = json.dumps(draw(st.dictionaries(st.text(max_size=10), json_values(), max_size=5))).encode()
    elif kind == "json":
        body = json.dumps(draw(json_values())).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "deep":
        depth = draw(st.sampled_from([999, 5_000, 100_000]))
        body = b'{"entry": ' + b"[" * depth + b"]" * depth + b"}"
    else:
        body = b'{"name": "' + b"x" * draw(st.sampled_from([BODY_LIMIT - 20, BODY_LIMIT + 1])) + b'"}'
    return Req(method, template, path_values, query, headers, body, sign_body=draw(st.booleans()))


# Header values as a server accepts them: visible ASCII and latin-1, no controls.
_PRINTABLE = bytes(c if 0x20 <= c < 0x7F or c >= 0xA0 else 0x2E for c in range(256))


def check(response: httpx.Response, req: Req) -> None:
    """The fuzz's invariants for one answer."""
    status = response.status_code
    # 502 is Graph's failure passed on (the stand-in refuses what it does not know); nothing else.
    assert status < 500 or status == 502, (status, response.text[:500])
    if status >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), response.text[:200]
        error = response.json()
        assert error["success"] is False and isinstance(error["error"], str) and error["error"]
        assert isinstance(error["code"], str) and error["code"]
    if (req.method, req.template) == ("POST", "/api/webhook") and req.sign_body:
        if req.body is not None and len(req.body) <= BODY_LIMIT:
            assert status == 200 and response.content == b"EVENT_RECEIVED", (status, response.text[:200])


def send(http: httpx.Client, req: Req) -> int:
    """Send one drawn request and check its answer (an event stream is read no further than its head);
    returns the status."""
    values = iter(req.path_values)
    path = re.sub(r"\{[^}]+\}", lambda _: quote(next(values), safe=""), req.template)
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in req.query)
    url = path + ("?" + query if query else "")
    # A client cannot send surrounding whitespace in a header value (h11 refuses to): trim it.
    headers = {name.encode(): value.strip(b" \t") for name, value in req.headers.items()}
    if req.sign_body:
        headers[b"x-hub-signature-256"] = sign(APP_SECRET.encode(), req.body or b"").encode()
    with http.stream(req.method, url, headers=headers, content=req.body) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            assert response.status_code == 200
            assert next(response.iter_bytes()).startswith(b"retry:")
            return 200  # leaving closes the connection: the server sees the client go
        response.read()
    check(response, req)
    return response.status_code


def everywhere(routes: list[tuple[str, str]], ids: Ids) -> list[Req]:
    """Each route as a client calls it, then with U+0000 and then "²" in its query's pageId and in
    each of its path ids."""
    out = []
    for method, template in routes:
        out.append(plausible(method, template, ids))
        for bad in ("a\x00", "²"):
            req = plausible(method, template, ids)
            req.query = [("pageId", bad)]
            out.append(req)
            for i in range(len(req.path_values)):
                req = plausible(method, template, ids)
                req.path_values[i] = bad
                out.append(req)
    return out


def known_failures(page_id: str) -> list[Req]:
    """Requests that each answered 500 once (some on PostgreSQL only): always among the examples."""
    key = {"authorization": f"Bearer {KEYS['alice']}".encode()}
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        Req(
            "GET", "/api/conversations", [], [("pageId", page_id), ("cursor", OVERFLOWING_CURSOR)], key, None
        ),
        Req("GET", "/api/conversations/{conversation_id}/events", ["²"], [], key, None),
        Req("GET", "/api/conversations/{conversation_id}/events", ["١٢"], [], key, None),
        Req("GET", "/api/events/stream", [], [("pageId", page_id), ("lastEventId", "²")], key, None),
        Req("GET", "/api/conversations", [], [("pageId", page_id + "\x00")], key, None),
        Req("POST", "/api/pages", [], [], key, b'{"x": ' + deep + b"}"),
        Req("POST", "/api/conversations/sync", [], [], key, b'{"pageId": "a\\u0000", "facebookPageId": "1"}'),
        Req("POST", "/api/webhook", [], [], {}, deep, sign_body=True),
    ]


async def _seed(storage: Storage) -> Ids:
    ids = Ids()
    for user, fb_id in (("alice", PAGE), ("alice", OTHER_PAGE), ("bob", PAGE)):
        page, _ = await storage.register_page(user, fb_id, page_token(fb_id, user), "Seed")
        ids.pages.append(page.id)
    events = [
        EventRecord(
            event_type="message_received", message_id=f"m_seed_{i}", event_timestamp=1_732_900_000_000 + i
        )
        for i in range(3)
    ]
    await write_conversations(
        storage, ids.pages[0], [ConversationRecord(sender_id="7712345678901234", events=events)]
    )
    (conversation,) = await storage.list_conversations(ids.pages[0], 1, None)
    ids.conversations.append(conversation.id)
    ids.events += [e.id for e in await storage.list_events(conversation.id, 10, None)]
    return ids


async def test_fuzz_every_route(
    settings: Settings, storage: Storage, serve_in_thread: Callable[..., Any]
) -> None:
    ids = await _seed(storage)
    router = graph_router(GraphMe())
    router.get(path__regex=r"/\d+/conversations").respond(200, json={"data": []})
    error = {"error": {"message": "Unsupported get request", "type": "GraphMethodException", "code": 100}}
    router.route().respond(400, json=error)  # anything else Graph is asked
    admin = Settings(**{**settings.__dict__, "admin_keys": frozenset({KEYS["alice"]})})
    routes = endpoints(create_app(admin).routes)

    outcomes: Counter[tuple[str, str, int]] = Counter()

    @settings_for_ci
    @given(req=requests(routes, ids))
    def fuzz(http: httpx.Client, req: Req) -> None:
        outcomes[req.method, req.template, send(http, req)] += 1

    # Always among the examples: each route as a client calls it, with U+0000 and non-ASCII digits
    # in each of its ids, and what once answered 500.
    for known in [*everywhere(routes, ids), *known_failures(ids.pages[0])]:
        fuzz = example(req=known)(fuzz)

    def run() -> None:
        # The server runs in a thread with its own loop; hypothesis drives it with a blocking client.
        with (
            serve_in_thread(admin, graph_transport(router)) as base,
            httpx.Client(base_url=base, timeout=30) as http,
        ):
            fuzz(http)
            assert http.get("/healthz").status_code == 200

    await asyncio.to_thread(run)
    # Not vacuous: every route was called, and most got past the key and the lookups somewhere.
    reached = {(method, template) for method, template, _ in outcomes}
    assert set(routes) <= reached, set(routes) - reached
    succeeded = {(method, template) for method, template, status in outcomes if status < 400}
    assert len(succeeded) >= len(routes) // 2, "\n".join(map(str, sorted(outcomes.items())))


settings_for_ci = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
