"""schemathesis against the service's own /openapi.json, on both engines (issue 11, item 3).

The schema is loaded from the app in process (`schemathesis.openapi.from_asgi`), whose lifespan
then runs in schemathesis' event loop: storage, applier, inbox writer, everything but the Graph
API, which is respx (the `graph` fixture: /me and a four-page conversation walk; nothing leaves
the process). Some data is seeded through the API first (alice's and bob's registrations of the
test Page, alice's second page, a full sync, signed webhooks), so that real ids exist.

Every operation of the document is fuzzed (the deletions last, so that they do not empty what
the others read; DELETE /api/pages/{page_id} gets alice's second page, not her first):

* schemathesis' coverage phase: deterministic cases for each parameter's and each body field's
  edges, valid and not, and methods the route does not take;
* hypothesis-driven cases, positive and negative, some with the seeded ids put in the path,
  query or body (a page, a conversation, a stream from the start, a sync of the page,
  registrations, Meta's own webhook bodies from fixtures/webhooks/), each sent by a caller drawn
  for it: alice's key, bob's, an admin's, no key, a wrong key, a key without `Bearer`; the webhook
  signed, signed with another secret, or with whatever signature schemathesis generated.

Each response goes through schemathesis' not_a_server_error, status_code_conformance,
content_type_conformance and response_schema_conformance (every documented response validates,
each Server-Sent Event's data too), negative_data_rejection, and our checks (tests/helpers/fuzz.py):
every 4xx/5xx in the SPEC's error shape; 401 `unauthorized` without a valid key, never 401 with
one, 403 `admin_only` on the admin views for a key not in ADMIN_KEYS, 200 `EVENT_RECEIVED` for
every correctly signed webhook and 401 for any other (judged by what the request really
carried); a stream's events of the page asked for, after Last-Event-ID.

The event stream never ends by itself: schemathesis bounds it by time, with a request timeout
for that operation in its config (its ASGI transport ends the call at the deadline and keeps what
the stream sent). Afterwards, once the inbox is drained, the seed's data checks must still hold
(no conversation without events, no duplicate event or conversation).

Bounded for CI: EXAMPLES hypothesis examples per operation and engine (SCHEMATHESIS_EXAMPLES),
from a seed printed at the start (SCHEMATHESIS_SEED replays a run); no example database.
`pytest -s` prints the requests fuzzed, per status and operation, and every 500 seen.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import requests
import respx
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from app import create_app
from core.settings import Settings
from storage import open_storage
from tests.helpers import DEFAULT_PAGE, graph_transport, make_settings, page_token
from tests.helpers.fuzz import (
    ADMIN_KEY,
    ALL_KEYS,
    WEBHOOK,
    Caller,
    Tally,
    callers_for,
    dress,
    error_shape,
    stream_events_conform,
    who_may_call,
)
from tests.helpers.sync import WALK, FakeGraph, assert_seed_checks, chain, query
from tests.helpers.webhook import WEBHOOKS, message_body, signed

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "30"))  # hypothesis examples per operation
SEED = int(os.environ.get("SCHEMATHESIS_SEED", "20251111"))
STREAM_SECONDS = 0.25  # how long schemathesis reads an event stream before it cuts it
DRAIN_SECONDS = 30.0  # a bound for a failing test, not a timing check

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Fuzzed last, in this order: they remove what the other operations read.
DESTRUCTIVE = ["DELETE /api/conversations/{conversation_id}", "DELETE /api/pages/{page_id}"]
DOOMED_PAGE = "104325188700009"  # alice's second page: the one whose id DELETE /api/pages/{page_id} gets


@dataclass
class Seeded:
    """The ids the seed created, that the fuzz puts in paths, queries and bodies."""

    alice_page: str
    bob_page: str
    doomed_page: str
    conversations: list[int]
    webhook_bodies: list[bytes] = field(default_factory=list)


def fuzz_config() -> schemathesis.Config:
    """The run's schemathesis configuration: the stream bounded by time, the seed."""
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "request-timeout": 30,
            "operations": [
                {
                    "include-path": "/api/events/stream",
                    "request-timeout": STREAM_SECONDS,
                    "max-stream-events": 50,
                }
            ],
        }
    )


@pytest.fixture
def fuzz_settings(db_url: str) -> Settings:
    """Alice and bob, and carol whose key is also an admin key."""
    return make_settings(
        db_url,
        api_keys={key: user for user, key in ALL_KEYS.items()},
        admin_keys=frozenset({ADMIN_KEY}),
    )


@pytest.fixture
def api(fuzz_settings: Settings, graph: respx.MockRouter) -> Iterator[BaseSchema]:
    """The schema loaded from the app (its lifespan started); the lifespan is ended afterwards."""
    FakeGraph(graph, chain(*WALK))
    app = create_app(fuzz_settings, graph_transport=graph_transport(graph))
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app, config=fuzz_config())
    finally:
        asgi.shutdown_lifespans()


def _ok(response: requests.Response, *statuses: int) -> Any:
    assert response.status_code in statuses, f"{response.status_code}: {response.text}"
    return (
        response.json() if response.headers.get("content-type", "").startswith("application/json") else None
    )


def wait_for_inbox(http: requests.Session) -> dict[str, Any]:
    """Poll the admin view until no inbox row is pending."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while True:
        health = _ok(http.get("/api/admin/inbox", headers={"Authorization": f"Bearer {ADMIN_KEY}"}), 200)
        if health["pending"] == 0:
            return dict(health)
        assert time.monotonic() < deadline, f"inbox still pending: {health}"
        time.sleep(0.05)


def seed(schema: BaseSchema) -> Seeded:
    """Pages, a full sync and webhooks, through the API, in the lifespan the fuzz uses."""
    assert schema.app is not None
    alice, bob = ({"Authorization": f"Bearer {ALL_KEYS[u]}"} for u in ("alice", "bob"))
    with asgi.get_client(schema.app) as http:
        pages = []
        for user, headers, fb_page in (
            ("alice", alice, DEFAULT_PAGE),
            ("bob", bob, DEFAULT_PAGE),
            ("alice", alice, DOOMED_PAGE),
        ):
            registration = {
                "facebookPageId": fb_page,
                "accessToken": page_token(fb_page, user),
                "name": "Shop",
            }
            pages.append(_ok(http.post("/api/pages", json=registration, headers=headers), 201)["pageId"])
        sync = {"pageId": pages[0], "facebookPageId": DEFAULT_PAGE, "mode": "full"}
        assert _ok(http.post("/api/conversations/sync", json=sync, headers=alice), 200)["hasMore"] is False
        # A contact only webhooks know, sent twice (one event), and a message the sync stored too.
        hooks = [message_body("m_fuzz_seed_1", "hello", 1_764_421_200_000, sender="7700000000000001")] * 2
        hooks += [(WEBHOOKS / "message_text.json").read_bytes()]
        hooks += [message_body("m_fuzz_seed_2", "bye", 1_764_421_200_001, page=DOOMED_PAGE)]
        for body in hooks:
            assert _ok(http.post(WEBHOOK, data=body, headers=signed(body)), 200) is None
        wait_for_inbox(http)
        listed = _ok(http.get(f"/api/conversations?pageId={pages[0]}&limit=500", headers=alice), 200)
    conversations = [c["id"] for c in listed["conversations"]]
    assert len(conversations) >= 13, listed  # the walk's twelve contacts and the webhook's one
    bodies = [path.read_bytes() for path in sorted(WEBHOOKS.glob("*.json"))]
    return Seeded(pages[0], pages[1], pages[2], conversations, bodies)


def with_real_ids(operation: APIOperation, ids: Seeded) -> list[st.SearchStrategy[Case]]:
    """Positive cases of `operation` carrying ids that exist (the rest of the request generated)."""
    path = operation.path
    params = {p.name for p in operation.path_parameters}
    strategies: list[st.SearchStrategy[Case]] = []
    if "page_id" in params:
        doomed = operation.method.upper() == "DELETE"
        for page in (ids.doomed_page if doomed else ids.alice_page, ids.bob_page):
            strategies.append(operation.as_strategy(path_parameters={"page_id": page}))
    if "conversation_id" in params:
        for conversation in ids.conversations[:3]:
            strategies.append(operation.as_strategy(path_parameters={"conversation_id": conversation}))
    if any(p.name == "pageId" for p in operation.query):
        strategies.append(operation.as_strategy(query={"pageId": ids.alice_page}))
    if path == "/api/events/stream":  # from the start, or after an event: the stored events flow
        strategies.append(operation.as_strategy(query={"pageId": ids.alice_page, "lastEventId": 0}))
        strategies.append(
            operation.as_strategy(query={"pageId": ids.alice_page}, headers={"Last-Event-ID": "5"})
        )
    if path.startswith("/api/conversations/sync"):
        for extra in (
            {},
            {"mode": "full"},
            {"mode": "incremental", "maxDurationMs": 1},
            {"resumeSession": "x"},
        ):
            body = {"pageId": ids.alice_page, "facebookPageId": DEFAULT_PAGE, **extra}
            strategies.append(operation.as_strategy(body=body))
    if path == "/api/pages" and operation.method.upper() == "POST":
        for registration in (
            {"facebookPageId": DEFAULT_PAGE, "accessToken": page_token(DEFAULT_PAGE, "alice")},  # 200
            {"facebookPageId": "104325188700001", "accessToken": page_token("104325188700001", "x")},  # 201
            {"facebookPageId": "104325188700002", "accessToken": page_token(DEFAULT_PAGE, "alice")},  # 403
        ):
            strategies.append(operation.as_strategy(body=registration))
    return strategies


def webhook_bodies(operation: APIOperation, ids: Seeded) -> st.SearchStrategy[bytes | None]:
    """For POST /api/webhook: now and then one of Meta's bodies (fixtures) instead of a generated one."""
    if (operation.method.upper(), operation.path) != ("POST", WEBHOOK):
        return st.none()
    return st.one_of(st.none(), st.sampled_from(ids.webhook_bodies))


class Fuzz:
    """Sends cases as a caller, checks their answers, counts them; collects what failed."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.failures: list[str] = []

    def send(self, case: Case, caller: Caller, body: bytes | None = None) -> None:
        kwargs = dress(case, caller, body)
        response = case.call(**kwargs)
        self.tally.record(case, response)
        case.validate_response(
            response,
            checks=CHECKS,
            additional_checks=[error_shape, stream_events_conform, who_may_call],
            transport_kwargs=kwargs,
        )

    def run(self, label: str, test: Callable[..., None], *args: Any) -> None:
        """Run a test; a failure is kept (hypothesis has shrunk it) and the run goes on."""
        try:
            test(*args)
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
            self.failures.append(f"{label}: {type(exc).__name__}: {exc}")


def coverage_cases(schema: BaseSchema, operation: APIOperation) -> Iterator[Case]:
    """schemathesis' coverage phase for one operation: each parameter's edges, valid and not."""
    generation = schema.config.generation_for(operation=operation, phase="coverage")
    yield from schema.iter_coverage_cases(
        operation,
        generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=generation,
    )


def fuzz_operation(fuzz: Fuzz, operation: APIOperation, ids: Seeded) -> None:
    """Hypothesis-driven cases of one operation, positive and negative, some with real ids."""
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        *with_real_ids(operation, ids),
    )
    callers = st.sampled_from(callers_for(operation.path, operation.method.upper()))

    @hypothesis.seed(SEED)
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(case=cases, caller=callers, body=webhook_bodies(operation, ids))
    def test(case: Case, caller: Caller, body: bytes | None) -> None:
        fuzz.send(case, caller, body)

    fuzz.run(f"{operation.label} (fuzzing)", test)


def test_schemathesis_against_the_served_document(api: BaseSchema, fuzz_settings: Settings) -> None:
    print(f"\nschemathesis {schemathesis.__version__}: seed {SEED} (SCHEMATHESIS_SEED), {EXAMPLES} examples")
    ids = seed(api)
    results = list(api.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results  # the document itself is valid
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    operations.sort(key=lambda op: DESTRUCTIVE.index(op.label) if op.label in DESTRUCTIVE else -1)
    assert len(operations) >= 24, [op.label for op in operations]

    fuzz = Fuzz()
    for index, operation in enumerate(operations):
        callers = callers_for(operation.path, operation.method.upper())
        for number, case in enumerate(coverage_cases(api, operation)):
            caller = callers[(number + index) % len(callers)]
            fuzz.run(f"{operation.label} (coverage, {caller.name})", fuzz.send, case, caller)
        fuzz_operation(fuzz, operation, ids)

    with asgi.get_client(api.app) as http:
        inbox = wait_for_inbox(http)
    asgi.shutdown_lifespans()
    print(fuzz.tally.summary())
    print(", ".join(f"{label}: {n}" for label, n in fuzz.tally.per_operation.items()))
    print(f"inbox after the fuzz: {json.dumps({k: v for k, v in inbox.items() if k != 'recentErrors'})}")
    for line in fuzz.tally.server_errors:
        print(f"500: {line}")

    async def data_checks() -> tuple[int, int]:
        storage = await open_storage(fuzz_settings.database_url)
        try:
            await assert_seed_checks(storage)
            (conversations,) = await query(storage, "SELECT count(*) AS n FROM messenger_conversations")
            (events,) = await query(storage, "SELECT count(*) AS n FROM contact_interaction_events")
            return int(conversations["n"]), int(events["n"])
        finally:
            await storage.close()

    conversations, events = 0, 0
    try:
        conversations, events = asyncio.run(data_checks())
    except AssertionError as exc:
        fuzz.failures.append(f"the seed's data checks after the fuzz: {exc}")
    print(f"left for the data checks: {conversations} conversations, {events} events")
    assert not fuzz.failures, f"{len(fuzz.failures)} failures:\n\n" + "\n\n".join(fuzz.failures[:20])
    assert fuzz.tally.server_errors == []
    assert conversations >= 10  # alice's page kept most of its rows: the checks were not vacuous
    assert fuzz.tally.streams > 0  # the stream was reached, and bounded by the timeout
