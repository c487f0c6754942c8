"""Messenger webhook bodies, decoded and turned into conversation records.

``decode_webhook`` validates the raw body against ``schema.webhook`` (msgspec errors
keep their JSON path; the caller answers 400 with the message). ``webhook_records``
maps every messaging and standby item to a ``records.EventRecord`` and groups them into
one ``records.ConversationRecord`` per (page, contact), which storage writes exactly as
it writes what the sync engine produces.

Mapping (SPEC data model); the contact is the user's PSID:

    item kind          event_type         message_id     payload
    message            message_received   mid            attachments, quick_reply, ...
    message (is_echo)  message_sent       mid            app_id, metadata, ...
    delivery           message_delivered  None           mids, watermark
    read               message_read       None           watermark
    reaction           reaction           None           mid, action, reaction, emoji
    postback           postback           postback.mid   payload, title, referral?
    referral           referral           None           ref, source, type, ...
    optin              optin              None           type, payload, ref, ...
    message_edit       message_edited     None           mid, text, num_edit

The contact is the sender, except for echoes (the recipient). Items are attributed to
the entry's page id, whatever their sender/recipient say. Items of an unknown kind, or
without a contact PSID (plugin opt-ins carry only a ``user_ref``), are counted in
``ParsedWebhook.unknown`` and otherwise skipped.
"""

from __future__ import annotations

from typing import Any

import msgspec

from core.records import MESSAGE_EVENT_TYPES, ConversationRecord, EventRecord, attachment_label
from schema.webhook import Message, MessagingItem, Referral, WebhookBody

_decoder = msgspec.json.Decoder(WebhookBody)


class ParsedWebhook(msgspec.Struct, kw_only=True):
    """What a webhook body brings.

    ``items``: one record per (facebook page id, contact). ``unknown``: items skipped
    because their kind is unknown or they name no contact.
    """

    items: list[tuple[str, ConversationRecord]]
    unknown: int = 0


def decode_webhook(body: bytes) -> WebhookBody:
    """Decode and validate a raw webhook body.

    Raises ``msgspec.DecodeError`` for bytes that are not JSON, and its subclass
    ``msgspec.ValidationError`` for JSON of the wrong shape (the message ends with the
    JSON path, e.g. ``- at `$.entry[0].messaging[1].timestamp```).
    """
    return _decoder.decode(body)


def _referral_dict(referral: Referral) -> dict[str, Any]:
    return {k: v for k, v in msgspec.structs.asdict(referral).items() if v is not None}


def _message_event(item: MessagingItem, message: Message) -> EventRecord:
    payload: dict[str, Any] = {}
    content = message.text
    if message.attachments:
        payload["attachments"] = [{"type": a.type, "payload": a.payload} for a in message.attachments]
        if content is None:
            content = attachment_label([a.type for a in message.attachments])
    if message.quick_reply is not None:
        payload["quick_reply"] = {"payload": message.quick_reply.payload}
    if message.reply_to is not None:
        payload["reply_to"] = {"mid": message.reply_to.mid}
    if message.referral is not None:
        payload["referral"] = _referral_dict(message.referral)
    if message.is_echo:
        if message.app_id is not None:
            payload["app_id"] = message.app_id
        if message.metadata is not None:
            payload["metadata"] = message.metadata
    if message.is_deleted:
        payload["is_deleted"] = True
    if message.is_unsupported:
        payload["is_unsupported"] = True
    return EventRecord(
        event_type="message_sent" if message.is_echo else "message_received",
        event_timestamp=item.timestamp,
        message_id=message.mid,
        content=content,
        payload=payload,
    )


def _event(item: MessagingItem) -> EventRecord | None:
    """The event an item carries, or None for a kind this service does not know."""
    ts = item.timestamp
    if item.message is not None:
        return _message_event(item, item.message)
    if item.message_edit is not None:
        edit = item.message_edit
        return EventRecord(
            event_type="message_edited",
            event_timestamp=ts,
            content=edit.text,
            payload={"mid": edit.mid, "text": edit.text, "num_edit": edit.num_edit},
        )
    if item.reaction is not None:
        r = item.reaction
        return EventRecord(
            event_type="reaction",
            event_timestamp=ts,
            payload={
                "mid": r.mid,
                "action": r.action,
                "reaction": r.reaction,
                "emoji": r.emoji,
            },
        )
    if item.delivery is not None:
        d = item.delivery
        return EventRecord(
            event_type="message_delivered",
            event_timestamp=ts,
            payload={"mids": list(d.mids or ()), "watermark": d.watermark},
        )
    if item.read is not None:
        return EventRecord(
            event_type="message_read",
            event_timestamp=ts,
            payload={"watermark": item.read.watermark},
        )
    if item.postback is not None:
        p = item.postback
        payload: dict[str, Any] = {"payload": p.payload, "title": p.title}
        if p.referral is not None:
            payload["referral"] = _referral_dict(p.referral)
        return EventRecord(
            event_type="postback",
            event_timestamp=ts,
            message_id=p.mid,
            content=p.title,
            payload=payload,
        )
    if item.referral is not None:
        return EventRecord(
            event_type="referral",
            event_timestamp=ts,
            payload=_referral_dict(item.referral),
        )
    if item.optin is not None:
        optin = {k: v for k, v in msgspec.structs.asdict(item.optin).items() if v is not None}
        return EventRecord(event_type="optin", event_timestamp=ts, payload=optin)
    return None


def _contact(item: MessagingItem, page_id: str) -> str | None:
    """The user's PSID: the recipient of an echo, else the sender.

    A non-echo item sent by the page itself (the sender is the entry's page) names the
    user as its recipient; attributing it to the page would create a bogus conversation.
    """
    sender = item.sender.id if item.sender is not None else None
    recipient = item.recipient.id if item.recipient is not None else None
    if (item.message is not None and item.message.is_echo) or (sender == page_id and recipient):
        return recipient
    return sender


def _event_key(event: EventRecord) -> tuple[str, str | int]:
    # Storage's uniqueness: (type, mid) when there is a mid, else (type, timestamp).
    if event.message_id is not None:
        return (event.event_type, event.message_id)
    return (event.event_type, event.event_timestamp)


def webhook_records(body: WebhookBody) -> ParsedWebhook:
    """Group the body's events into one ConversationRecord per (page id, contact).

    Events keep their arrival order (entries in order, ``messaging`` then ``standby``);
    an event repeated within the body (same storage key) is kept once.
    ``last_message``/``last_message_time`` are the newest message or echo among the
    record's events (None when it has none).
    """
    grouped: dict[tuple[str, str], ConversationRecord] = {}
    seen: dict[tuple[str, str], set[tuple[str, str | int]]] = {}
    unknown = 0
    for entry in body.entry:
        page_id = entry.id
        for items in (entry.messaging, entry.standby):
            for item in items:
                event = _event(item)
                contact = _contact(item, page_id) if event is not None else None
                if event is None or not contact:
                    unknown += 1
                    continue
                key = (page_id, contact)
                record = grouped.get(key)
                if record is None:
                    record = grouped[key] = ConversationRecord(sender_id=contact, events=[])
                    seen[key] = set()
                event_key = _event_key(event)
                if event_key in seen[key]:
                    continue
                seen[key].add(event_key)
                record.events.append(event)
                if (
                    event.event_type in MESSAGE_EVENT_TYPES
                    and not event.payload.get("is_deleted")
                    and (
                        record.last_message_time is None or event.event_timestamp >= record.last_message_time
                    )
                ):
                    record.last_message = event.content
                    record.last_message_time = event.event_timestamp
    return ParsedWebhook(items=[(page, record) for (page, _), record in grouped.items()], unknown=unknown)
