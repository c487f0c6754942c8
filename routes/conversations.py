"""Keyset-paginated reads: a page's conversations and a conversation's events, newest first."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from core.errors import NotFound
from routes.auth import require_user
from routes.common import JSON, decode_cursor, encode_cursor, path_int_id, query_id, query_int

MAX_LIMIT = 500


async def list_conversations(request: Request) -> JSON:
    """GET /api/conversations?pageId=&limit=&cursor=."""
    user = await require_user(request)
    page_id = query_id(request, "pageId")
    limit = query_int(request, "limit", 50, 1, MAX_LIMIT)
    after = decode_cursor(request.query_params.get("cursor"))
    storage = request.state.storage
    if await storage.get_page(user, page_id) is None:
        raise NotFound("Page not found")
    rows = await storage.list_conversations(page_id, limit + 1, after)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor((rows[-1]["lastMessageTime"] or 0, rows[-1]["id"])) if more else None
    return JSON({"conversations": rows, "nextCursor": cursor})


async def list_events(request: Request) -> JSON:
    """GET /api/conversations/{id}/events?limit=&cursor=."""
    user = await require_user(request)
    conversation_id = path_int_id(request, "conversation_id")
    if conversation_id is None:
        raise NotFound("Conversation not found")
    limit = query_int(request, "limit", 50, 1, MAX_LIMIT)
    after = decode_cursor(request.query_params.get("cursor"))
    storage = request.state.storage
    if await storage.get_conversation(user, conversation_id) is None:
        raise NotFound("Conversation not found")
    rows = await storage.list_events(conversation_id, limit + 1, after)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor((rows[-1]["eventTimestamp"], rows[-1]["id"])) if more else None
    return JSON({"events": rows, "nextCursor": cursor})


routes = [
    Route("/api/conversations", list_conversations, methods=["GET"]),
    Route("/api/conversations/{conversation_id}/events", list_events, methods=["GET"]),
]
