"""Turn a Graph API conversation into the records storage writes (see ``records.py``).

The contact is the participant who is not the page; each of the (at most 20) messages
Graph details becomes one event: ``message_sent`` when the page wrote it, else
``message_received``, keyed by its mid so that the same message arriving by webhook
lands on the same event.
"""

from __future__ import annotations

from typing import Any

from core.records import ConversationRecord, EventRecord, attachment_label
from schema.graph import Conversation, Message

ATTACHMENT_PLACEHOLDER = "[attachment]"  # a message with neither text nor attachment details


def conversation_to_record(conv: Conversation, page_fb_id: str) -> ConversationRecord | None:
    """The record of one Graph conversation, or None when it cannot be keyed or has no messages.

    None (the caller counts it as skipped) when no participant other than the page is
    listed, or when Graph gave no message details.
    """
    contact = next((p for p in conv.participants.data if p.id != page_fb_id), None)
    messages = conv.messages.data
    if contact is None or not messages:
        return None
    events = [_message_event(message, page_fb_id) for message in messages]
    newest = max(messages, key=lambda message: message.created_time)
    return ConversationRecord(
        sender_id=contact.id,
        sender_name=contact.name,
        facebook_conversation_id=conv.id,
        events=events,
        last_message=_content(newest) or ATTACHMENT_PLACEHOLDER,
        last_message_time=newest.created_time_ms,
        message_count=conv.message_count,
        unread_count=conv.unread_count,
    )


def _message_event(message: Message, page_fb_id: str) -> EventRecord:
    payload: dict[str, Any] = {
        "from": message.from_.id,
        "to": [party.id for party in message.to.data],
    }
    if message.attachments is not None and message.attachments.data:
        payload["attachments"] = message.attachments.data
    return EventRecord(
        event_type="message_sent" if message.from_.id == page_fb_id else "message_received",
        event_timestamp=message.created_time_ms,
        message_id=message.id,
        content=_content(message),
        payload=payload,
    )


def _attachment_type(attachment: dict[str, Any]) -> str:
    """A webhook-style attachment type (image, video, audio, file) from Graph's mime_type."""
    kind = str(attachment.get("mime_type") or "").split("/", 1)[0]
    return kind if kind in ("image", "video", "audio") else "file"


def _content(message: Message) -> str | None:
    """The text; for an attachment-only message (Graph sends ""), the label webhooks use."""
    if message.message:
        return message.message
    if message.attachments is not None and message.attachments.data:
        return attachment_label([_attachment_type(a) for a in message.attachments.data])
    return None
