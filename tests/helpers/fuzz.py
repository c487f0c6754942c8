"""What the schemathesis run (tests/proof/test_schemathesis.py) needs besides schemathesis: who
calls (a valid key, another user's, an admin's, none, a wrong one; for the webhook a signature
right, wrong or missing), the SPEC's own checks (the error shape, 401 without a valid key, 403 for
the admin views, 200 for every signed webhook), and the tally of what was sent and answered.

The checks are schemathesis check functions, ``(ctx, response, case) -> None`` raising
AssertionError, so a failure is reported by schemathesis like its own, with a curl line.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from schemathesis import Case, CheckContext, Response

from tests.helpers import APP_SECRET, KEYS
from webhook.signature import sign

ADMIN_USER = "carol"
ADMIN_KEY = "key-carol-admin-0123456789"
ALL_KEYS = {**KEYS, ADMIN_USER: ADMIN_KEY}  # user -> key: alice and bob, and carol the admin

WEBHOOK = "/api/webhook"
ADMIN_PATHS = ("/api/admin/inbox", "/api/admin/inbox/replay")


@dataclass(frozen=True)
class Caller:
    """Who sends a request: the Authorization header (or, for the webhook, the signature) it carries."""

    name: str
    authorization: str | None = None  # the header to send (None: no header)
    signature: str = "none"  # POST /api/webhook: "valid", "wrong" or "none" (whatever was generated)


ALICE = Caller("alice", f"Bearer {KEYS['alice']}")
BOB = Caller("bob", f"Bearer {KEYS['bob']}")
ADMIN = Caller("admin", f"Bearer {ADMIN_KEY}")
ANONYMOUS = Caller("no key")
WRONG_KEY = Caller("wrong key", "Bearer key-nobody-0123456789")
NOT_BEARER = Caller("not bearer", f"Basic {KEYS['alice']}")
# Most requests carry alice's key, so that they get past authentication to the code behind it.
API_CALLERS = [ALICE, ALICE, ALICE, ALICE, BOB, ADMIN, ANONYMOUS, WRONG_KEY, NOT_BEARER]
SIGNED = Caller("signed", signature="valid")
WEBHOOK_CALLERS = [SIGNED, SIGNED, SIGNED, Caller("unsigned"), Caller("wrong signature", signature="wrong")]


def callers_for(case_path: str, method: str) -> list[Caller]:
    """The callers drawn for an operation (weighted by repetition)."""
    return WEBHOOK_CALLERS if (method, case_path) == ("POST", WEBHOOK) else API_CALLERS


def needs_key(case: Case) -> bool:
    """Whether the operation is documented as needing `Authorization: Bearer <key>`."""
    return bool(case.operation.definition.raw.get("security"))


def raw_body(case: Case) -> bytes:
    """The bytes the transport would send as the case's body (b"" without one)."""
    kwargs = case.as_transport_kwargs()
    if "json" in kwargs:
        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data")
    if data is None:
        return b""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes):
        return data
    raise AssertionError(f"cannot sign a body of type {type(data).__name__}")


def dress(case: Case, caller: Caller, body: bytes | None = None) -> dict[str, Any]:
    """Put the caller's credentials on the case; the extra keyword arguments for `case.call`.

    The generated Authorization header (schemathesis may draw one) is replaced by the caller's,
    or removed for a caller without one. A webhook body is sent as the exact bytes signed.
    """
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if caller.authorization is not None:
        headers["Authorization"] = caller.authorization
    kwargs: dict[str, Any] = {}
    if (case.method.upper(), case.operation.path) == ("POST", WEBHOOK):
        payload = raw_body(case) if body is None else body
        if caller.signature != "none":  # else the generated header (if any) is sent: never a valid one
            headers = {k: v for k, v in headers.items() if k.lower() != "x-hub-signature-256"}
            secret = APP_SECRET.encode() if caller.signature == "valid" else b"not-the-app-secret"
            headers["X-Hub-Signature-256"] = sign(secret, payload)
        kwargs["data"] = payload
    elif body is not None:
        kwargs["data"] = body
    case.headers = headers  # type: ignore[assignment]  # schemathesis takes a plain dict too
    return kwargs


# ---- checks ----------------------------------------------------------------------------------


def _route_matched(case: Case, response: Response) -> bool:
    """Whether the request reached the operation's route: its method, and a path its template
    matches (a path id holding a `/` once decoded is another path; the router answers 404)."""
    if case.method.upper() != case.operation.method.upper():
        return False
    parts = re.split(r"(\{[^}]+\})", case.operation.path)
    pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
    path = unquote(urlsplit(str(response.request.url)).path)
    return re.fullmatch(pattern, path) is not None


def _refused_before_routing(response: Response) -> bool:
    """A 400 from the HTTP limits (U+0000 in the path or query), which answer before any route."""
    body = _json(response)
    return response.status_code == 400 and isinstance(body, dict) and "U+0000" in str(body.get("error"))


def _json(response: Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def error_shape(ctx: CheckContext, response: Response, case: Case) -> None:
    """Every 4xx/5xx body is JSON in the SPEC's shape: {"success": false, "error": str, "code": str}."""
    if response.status_code < 400:
        return
    media = (response.headers.get("content-type") or [""])[0].split(";")[0].strip()
    assert media == "application/json", f"error {response.status_code} answered as {media!r}"
    body = _json(response)
    assert isinstance(body, dict), f"error body is not a JSON object: {response.content[:200]!r}"
    assert body.get("success") is False, f"error body without success=false: {body}"
    assert isinstance(body.get("error"), str) and body["error"], f"error body without a message: {body}"
    assert isinstance(body.get("code"), str) and body["code"], f"error body without a code: {body}"


def _stream_events(content: bytes) -> list[dict[str, str]]:
    """The events of an event stream's body: each block's fields (`data` lines joined)."""
    events = []
    for block in re.split(rb"\r\n\r\n|\n\n|\r\r", content):
        fields: dict[str, str] = {}
        for line in block.decode().splitlines():
            name, _, value = line.partition(":")
            if name:  # a line starting with ":" is a comment (the heartbeat)
                value = value.removeprefix(" ")
                fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value
        if "data" in fields:
            events.append(fields)
    return events


def stream_events_conform(ctx: CheckContext, response: Response, case: Case) -> None:
    """An event stream's events (their data schemathesis validates against the document's EventBody):
    `id` the event's id, of the page asked for, and only events after Last-Event-ID."""
    media = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not media.startswith("text/event-stream"):
        return
    query = dict(parse_qsl(urlsplit(str(response.request.url)).query))
    after = _sent_header(response, "last-event-id") or query.get("lastEventId")
    for event in _stream_events(response.content):
        data = json.loads(event["data"])
        assert event.get("id") == str(data["id"]), f"id: {event.get('id')} for event {data['id']}"
        assert data["pageId"] == query.get("pageId"), f"an event of page {data['pageId']}"
        if after:
            assert data["id"] > int(after), f"event {data['id']} sent after Last-Event-ID {after!r}"


def _sent_header(response: Response, name: str) -> str | None:
    value = response.request.headers.get(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _sent_body(response: Response) -> bytes:
    body = response.request.body
    if isinstance(body, str):
        return body.encode()
    return body if isinstance(body, bytes) else b""  # dress() sends every body as bytes


def _sent_key_owner(response: Response) -> str | None:
    """Whose valid key the request carried, read as the service reads `Authorization` (None: none)."""
    scheme, _, key = (_sent_header(response, "authorization") or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return {key: user for user, key in ALL_KEYS.items()}.get(key.strip())


def who_may_call(ctx: CheckContext, response: Response, case: Case) -> None:
    """The SPEC's rules for who may call what, judged by the credentials the request really carried
    (a negative case of schemathesis may drop or spoil the header the caller set): 401 without a
    valid key, never 401 with one, 403 `admin_only` on the admin views for a key not in ADMIN_KEYS;
    the webhook 200 `EVENT_RECEIVED` when correctly signed, 401 otherwise."""
    status = response.status_code
    if not _route_matched(case, response) or _refused_before_routing(response):
        return  # the router or the HTTP limits answered: no handler was reached
    code = (_json(response) or {}).get("code") if status >= 400 else None
    if (case.method.upper(), case.operation.path) == ("POST", WEBHOOK):
        signature = _sent_header(response, "x-hub-signature-256")
        if signature == sign(APP_SECRET.encode(), _sent_body(response)):
            assert status == 200 and response.content == b"EVENT_RECEIVED", (
                f"a correctly signed body was refused: {status} {response.content[:200]!r}"
            )
        else:
            assert status == 401 and code == "unauthorized", f"a webhook signed {signature!r}: {status}"
        return
    if not needs_key(case):
        return
    user = _sent_key_owner(response)
    if user is None:
        assert status == 401 and code == "unauthorized", f"no valid key: {status} {code}, not 401"
        return
    assert status != 401, f"a valid key ({user}'s) was refused: {response.content[:200]!r}"
    if case.operation.path in ADMIN_PATHS:
        if user == ADMIN_USER:
            assert status != 403, f"an admin key was refused: {response.content[:200]!r}"
        else:
            assert status == 403 and code == "admin_only", f"{user} saw an admin view: {status}"


# ---- the tally -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Requests sent and their answers, per operation; every 500 with its request."""

    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    streams: int = 0  # event streams answered 200: each ended only by schemathesis' timeout
    stream_events: int = 0  # the events they carried

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def record(self, case: Case, response: Response) -> None:
        self.statuses[response.status_code] += 1
        self.per_operation[case.operation.label] += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{response.status_code} {case.as_curl_command()}")
        media = (response.headers.get("content-type") or [""])[0]
        if response.status_code == 200 and media.startswith("text/event-stream"):
            self.streams += 1
            self.stream_events += len(_stream_events(response.content))

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (
            f"{self.requests} requests fuzzed over {len(self.per_operation)} operations "
            f"({statuses}); 500s seen: {sum(n for s, n in self.statuses.items() if s >= 500)}; "
            f"event streams opened: {self.streams} (each ended by schemathesis' timeout; "
            f"{self.stream_events} events in them)"
        )
