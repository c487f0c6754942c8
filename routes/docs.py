"""The API reference: GET /openapi.json (OpenAPI 3.1) and GET /docs (Swagger UI, served from here).

The document is drawn from the msgspec structs the code uses: request bodies from ``schema/api.py``
(and ``schema/webhook.py``), response bodies from ``schema/responses.py``, every error from
``ErrorBody``; ``msgspec.json.schema_components`` writes their JSON Schemas (2020-12, which OpenAPI
3.1 uses) under ``components/schemas``. ``OPERATIONS`` says, for each route of the app, which
struct goes in and out and which errors it may answer; tests/routes/test_openapi.py checks that
every route is in it and that real responses validate against it.

/docs is Swagger UI from the ``swagger-ui-bundle-v2`` package (Swagger UI 5, which reads OpenAPI
3.1; the older ``swagger-ui-bundle`` ships 4.15, which refuses 3.1 documents), served by the
service itself under /docs/assets: no CDN, no external network. Its page has no inline script
(static/docs.js starts it), under a Content-Security-Policy that allows only the service's own
scripts; inline styles are allowed on this page alone, because Swagger UI sets style attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from routes.common import JSON
from schema import responses as r
from schema.api import RegisterPage, SyncRequest
from schema.webhook import WebhookBody

TITLE = "Messenger Sync Service"
VERSION = "0.1.0"
REF = "#/components/schemas/{name}"

DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
DOCS_HEADERS = {
    "Content-Security-Policy": DOCS_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

ERROR_MEANINGS = {
    400: "Malformed request (bad JSON, a value out of range, U+0000 in the path or an id, a bad cursor)",
    401: "Missing or invalid API key (the webhook: missing or wrong X-Hub-Signature-256)",
    403: "Not allowed (an admin view without an admin key; a page token that is not the page's own)",
    404: "Not found, or another user's (answered as if it did not exist)",
    408: "The request body did not arrive within 30 s",
    409: "Sync already in progress (expiresAt: when the holder's lease ends) or its lease was lost",
    413: "Body larger than 1 MiB",
    429: "Too many open event streams for this API key",
    431: "Request headers over 64 KiB in all",
    500: "Unexpected error (requestId names it in the logs)",
    502: "The Graph API failed in a way retries cannot cure (graph_auth, graph_rate_limited, ...)",
    503: "The database is unreachable, the webhook is not configured, or the service is shutting down",
}


@dataclass(frozen=True)
class Param:
    """A query, path or header parameter."""

    name: str
    where: str  # query | path | header
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers."""

    summary: str
    ok: int = 200
    body: type | None = None  # the JSON response's struct (None: no JSON body)
    media: str = "application/json"  # of the success response
    request: type | None = None
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    bearer: bool = True  # needs Authorization: Bearer <key>
    database: bool = True  # 503 database_unavailable while the database is down
    also_ok: tuple[int, ...] = ()  # other success statuses with the same body (200 for an update)
    tags: tuple[str, ...] = field(default_factory=tuple)


def _int(lo: int, hi: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": lo}
    if hi is not None:
        schema["maximum"] = hi
    return schema


_STR = {"type": "string"}
_ID = {"type": "string", "minLength": 1}
INT64_MAX = 2**63 - 1  # ids are BIGINT: anything larger is no id (400 or 404)
PAGE_ID = Param("page_id", "path", _STR, "The pageId POST /api/pages returned", True)
CONVERSATION_ID = Param("conversation_id", "path", _int(1, INT64_MAX), "A conversation's id", True)
LIMIT = Param("limit", "query", _int(1, 500), "Items per page (default 50)")
CURSOR = Param("cursor", "query", _STR, "The nextCursor of the previous page")
SSE = "text/event-stream"
# One Server-Sent Event: with OpenAPI 3.1, a text/event-stream schema describes each event (3.2
# calls it itemSchema), its `data` here an EventBody's JSON.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "id": {"type": "string", "description": "The event's id (Last-Event-ID resumes after it)"},
        "event": {"type": "string"},
        "retry": {"type": "integer"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": REF.format(name="EventBody")},
        },
    },
}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/api/webhook"): Operation(
        "Webhook subscription check: echoes hub.challenge",
        body=None,
        media="text/plain",
        params=(
            Param("hub.mode", "query", {"const": "subscribe"}),
            Param("hub.verify_token", "query", _STR),
            Param("hub.challenge", "query", _STR),
        ),
        errors=(403,),
        bearer=False,
        database=False,
        tags=("webhook",),
    ),
    ("POST", "/api/webhook"): Operation(
        "Messenger webhook intake: acknowledged (EVENT_RECEIVED) once the raw body is in the inbox, "
        "whatever its shape",
        media="text/plain",
        request=WebhookBody,
        params=(Param("X-Hub-Signature-256", "header", _STR, "sha256=<hex> HMAC of the raw body", True),),
        errors=(401, 408, 413),
        bearer=False,
        tags=("webhook",),
    ),
    ("GET", "/healthz"): Operation(
        "The process is up", body=r.Health, database=False, bearer=False, tags=("ops",)
    ),
    ("GET", "/readyz"): Operation("The database is reachable", body=r.Health, bearer=False, tags=("ops",)),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics", media="text/plain", bearer=False, database=False, tags=("ops",)
    ),
    ("POST", "/api/pages"): Operation(
        "Register a page (201), or update its token (200); the token is verified with Graph first",
        ok=201,
        also_ok=(200,),
        body=r.PageBody,
        request=RegisterPage,
        errors=(400, 403, 408, 413, 502),
        tags=("pages",),
    ),
    ("GET", "/api/pages"): Operation(
        "The user's pages with their sync status", body=r.PageList, tags=("pages",)
    ),
    ("GET", "/api/pages/{page_id}"): Operation(
        "One page with its sync status", body=r.PageBody, params=(PAGE_ID,), errors=(404,), tags=("pages",)
    ),
    ("DELETE", "/api/pages/{page_id}"): Operation(
        "Delete a page with its conversations, events and sync state",
        ok=204,
        params=(PAGE_ID,),
        errors=(404,),
        tags=("pages",),
    ),
    ("GET", "/api/pages/{page_id}/activity"): Operation(
        "Events stored for the page per minute",
        body=r.PageActivity,
        params=(PAGE_ID, Param("minutes", "query", _int(1, 1440), "How many minutes (default 60)")),
        errors=(400, 404),
        tags=("pages",),
    ),
    ("GET", "/api/conversations"): Operation(
        "A page's conversations, newest first",
        body=r.ConversationList,
        params=(Param("pageId", "query", _ID, "", True), LIMIT, CURSOR),
        errors=(400, 404),
        tags=("conversations",),
    ),
    ("DELETE", "/api/conversations/{conversation_id}"): Operation(
        "Delete one contact's conversation, its events and the inbox rows carrying only that contact",
        ok=204,
        params=(CONVERSATION_ID,),
        errors=(404,),
        tags=("conversations",),
    ),
    ("GET", "/api/conversations/{conversation_id}/events"): Operation(
        "A conversation's events, newest first",
        body=r.EventList,
        params=(CONVERSATION_ID, LIMIT, CURSOR),
        errors=(400, 404),
        tags=("conversations",),
    ),
    ("GET", "/api/events/stream"): Operation(
        "Server-Sent Events: one message per stored event (data: an Event), resumable with Last-Event-ID",
        media="text/event-stream",
        params=(
            Param("pageId", "query", _ID, "", True),
            Param("Last-Event-ID", "header", _int(0, INT64_MAX), "Resume after this event id"),
            Param(
                "lastEventId", "query", _int(0, INT64_MAX), "The same, for clients that cannot set headers"
            ),
        ),
        errors=(400, 404, 429),
        tags=("conversations",),
    ),
    ("POST", "/api/conversations/sync"): Operation(
        "Run or continue a page's sync within its time budget",
        body=r.SyncResultBody,
        request=SyncRequest,
        errors=(400, 404, 408, 409, 413, 502),
        tags=("sync",),
    ),
    ("POST", "/api/conversations/sync-fixed"): Operation(
        "The same as POST /api/conversations/sync (the seed's path)",
        body=r.SyncResultBody,
        request=SyncRequest,
        errors=(400, 404, 408, 409, 413, 502),
        tags=("sync",),
    ),
    ("GET", "/api/sync/active"): Operation(
        "The user's live sync locks", body=r.ActiveSyncList, tags=("sync",)
    ),
    ("GET", "/api/sync/stats"): Operation(
        "Per page counts and sync progress", body=r.SyncStatisticsList, tags=("sync",)
    ),
    ("POST", "/api/sync/locks/cleanup"): Operation(
        "Remove expired sync leases", body=r.LocksRemoved, tags=("sync",)
    ),
    ("GET", "/api/me"): Operation("Who the key is", body=r.Me, tags=("admin",)),
    ("GET", "/api/admin/inbox"): Operation(
        "The webhook inbox's health (admin keys only)", body=r.InboxHealth, errors=(403,), tags=("admin",)
    ),
    ("POST", "/api/admin/inbox/replay"): Operation(
        "Put failed and invalid inbox rows back to pending (admin keys only)",
        body=r.Replayed,
        errors=(403,),
        tags=("admin",),
    ),
    ("GET", "/"): Operation("The dashboard", media="text/html", bearer=False, database=False, tags=("ops",)),
    ("GET", "/openapi.json"): Operation(
        "This document", media="application/json", bearer=False, database=False, tags=("ops",)
    ),
    ("GET", "/docs"): Operation(
        "Interactive API documentation", media="text/html", bearer=False, database=False, tags=("ops",)
    ),
}


def _parameter(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {"name": param.name, "in": param.where, "schema": param.schema}
    if param.description:
        out["description"] = param.description
    if param.required or param.where == "path":
        out["required"] = True
    return out


def _ref(struct: type) -> dict[str, Any]:
    return {"$ref": REF.format(name=struct.__name__)}


def _responses(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status in (op.ok, *op.also_ok):
        response: dict[str, Any] = {"description": op.summary if status == op.ok else "Updated"}
        if status != 204:
            if op.body is not None:
                response["content"] = {op.media: {"schema": _ref(op.body)}}
            elif op.media == SSE:
                response["content"] = {SSE: {"schema": SSE_EVENT}}
            else:
                response["content"] = {
                    op.media: {"schema": {"type": "string"} if op.media != "application/json" else {}}
                }
        out[str(status)] = response
    errors = set(op.errors) | {400, 431, 500}  # 400: U+0000 in the path; 431, 500: any route
    if op.bearer:
        errors.add(401)
    if op.database:
        errors.add(503)
    if op.request is not None:
        errors.update({408, 413})
    for status in sorted(errors):
        out[str(status)] = {
            "description": ERROR_MEANINGS[status],
            "content": {"application/json": {"schema": _ref(r.ErrorBody)}},
        }
    return out


def _structs() -> list[type]:
    found: list[type] = [r.ErrorBody]
    for op in OPERATIONS.values():
        for struct in (op.body, op.request):
            if struct is not None and struct not in found:
                found.append(struct)
    if r.EventBody not in found:
        found.append(r.EventBody)  # each Server-Sent Event's data
    return found


def _operation_id(method: str, path: str) -> str:
    words = path.strip("/").replace("{", "").replace("}", "").replace(".", "_").replace("-", "_")
    return f"{method.lower()}_{words.replace('/', '_') or 'root'}"


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route (built once per process)."""
    _, schemas = msgspec.json.schema_components(_structs(), ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), op in OPERATIONS.items():
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": _operation_id(method, path),
            "tags": list(op.tags),
            "responses": _responses(op),
        }
        if op.params:
            operation["parameters"] = [_parameter(p) for p in op.params]
        if op.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(op.request)}},
            }
        if op.bearer:
            operation["security"] = [{"apiKey": []}]
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Keeps a database copy of Facebook Pages' Messenger conversations. Every error "
            "is JSON: {success: false, error, code}.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "An API key"}},
        },
    }


_DOCS_PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Messenger Sync Service API</title>
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script>
</body>
</html>
"""


async def openapi_json(request: Request) -> JSON:
    """GET /openapi.json."""
    return JSON(openapi_document())


async def docs_page(request: Request) -> Response:
    """GET /docs: Swagger UI over /openapi.json."""
    return Response(_DOCS_PAGE, media_type="text/html; charset=utf-8", headers=DOCS_HEADERS)


class DocsAssets(StaticFiles):
    """Swagger UI's files, from the installed package."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


routes = [
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs_page, methods=["GET"]),
    Mount("/docs/assets", app=DocsAssets(directory=str(swagger_ui_path)), name="docs-assets"),
]
