"""Keyset-paginated reads (newest first), and deleting one contact's conversation.

GET    /api/conversations?pageId=&limit=&cursor=      a page's conversations
GET    /api/conversations/{id}/events?limit=&cursor=  a conversation's events
DELETE /api/conversations/{id}                        the conversation, its events, and the inbox
                                                      rows that carry only that contact's items
                                                      (a privacy request); 204, 404 for another
                                                      user's or an unknown id

A later full sync brings back what Graph still holds of a deleted conversation.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import NotFound
from routes.auth import require_user
from routes.common import JSON, decode_cursor, encode_cursor, path_int_id, query_id, query_int, services
from schema.responses import ConversationBody, ConversationList, EventBody, EventList
from storage.rows import ConversationRow, EventRow
from webhook.parse import read_webhook

log = logging.getLogger(__name__)

MAX_LIMIT = 500


def conversation_body(row: ConversationRow) -> ConversationBody:
    """The wire form of a conversation row."""
    return ConversationBody(
        id=row.id,
        page_id=row.page_id,
        facebook_conversation_id=row.facebook_conversation_id,
        sender_id=row.sender_id,
        sender_name=row.sender_name,
        last_message=row.last_message,
        last_message_time=row.last_message_time,
        message_count=row.message_count,
        unread_count=row.unread_count,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def event_body(row: EventRow) -> EventBody:
    """The wire form of an event row (also an SSE message's data)."""
    return EventBody(
        id=row.id,
        conversation_id=row.conversation_id,
        page_id=row.page_id,
        event_type=row.event_type,
        message_id=row.message_id,
        event_timestamp=row.event_timestamp,
        content=row.content,
        payload=row.payload,
        created_at=row.created_at,
    )


def contacts_of(body: bytes) -> list[tuple[str, str]]:
    """(facebook page id, contact PSID) of every item of an inbox body that names a contact;
    raises for a body that cannot be read (storage keeps such a row)."""
    parsed = read_webhook(body)
    return [(fb, record.sender_id) for fb, record in parsed.items] + [(fb, c) for fb, c, _ in parsed.unsent]


async def list_conversations(request: Request) -> JSON:
    """GET /api/conversations?pageId=&limit=&cursor=."""
    user = await require_user(request)
    page_id = query_id(request, "pageId")
    limit = query_int(request, "limit", 50, 1, MAX_LIMIT)
    after = decode_cursor(request.query_params.get("cursor"))
    storage = services(request).storage
    if await storage.get_page(user, page_id) is None:
        raise NotFound("Page not found")
    rows = await storage.list_conversations(page_id, limit + 1, after)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor((rows[-1].last_message_time or 0, rows[-1].id)) if more else None
    return JSON(ConversationList(conversations=[conversation_body(r) for r in rows], next_cursor=cursor))


async def list_events(request: Request) -> JSON:
    """GET /api/conversations/{id}/events?limit=&cursor=."""
    user = await require_user(request)
    conversation_id = path_int_id(request, "conversation_id")
    if conversation_id is None:
        raise NotFound("Conversation not found")
    limit = query_int(request, "limit", 50, 1, MAX_LIMIT)
    after = decode_cursor(request.query_params.get("cursor"))
    storage = services(request).storage
    if await storage.get_conversation(user, conversation_id) is None:
        raise NotFound("Conversation not found")
    rows = await storage.list_events(conversation_id, limit + 1, after)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor((rows[-1].event_timestamp, rows[-1].id)) if more else None
    return JSON(EventList(events=[event_body(r) for r in rows], next_cursor=cursor))


async def delete_conversation(request: Request) -> Response:
    """DELETE /api/conversations/{id}: 204, or 404 for an id that is not one of the user's."""
    user = await require_user(request)
    conversation_id = path_int_id(request, "conversation_id")
    if conversation_id is None or not await services(request).storage.delete_conversation(
        user, conversation_id, contacts_of
    ):
        raise NotFound("Conversation not found")
    log.info("conversation %d deleted by user %s", conversation_id, user)
    return Response(status_code=204)


routes = [
    Route("/api/conversations", list_conversations, methods=["GET"]),
    Route("/api/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
    Route("/api/conversations/{conversation_id}/events", list_events, methods=["GET"]),
]
