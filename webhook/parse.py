"""Messenger webhook bodies, read leniently and turned into conversation records.

``read_webhook`` is what the applier calls on an inbox row's raw bytes. It reads in layers
(``schema.webhook``): the envelope and its entries are the body's shape, and a failure there
raises ``InvalidWebhook`` (the row ends ``invalid``, replayable after a fix); each item of
``messaging``/``standby`` is decoded on its own, and one that cannot be read (a wrong type, a
value out of range) is skipped and reported with its JSON path in ``ParsedWebhook.skipped``,
while the rest of the body is applied (SPEC semantics 10).

``webhook_records`` maps every readable item to a ``records.EventRecord`` and groups them into
one ``records.ConversationRecord`` per (page, contact), which storage writes exactly as it
writes what the sync engine produces. Mapping (SPEC data model); the contact is the user's PSID:

    item kind            event_type         message_id     payload
    message              message_received   mid            attachments, quick_reply, reply_to, ...
    message (is_echo)    message_sent       mid            app_id, metadata, ...
    message (is_deleted) message_deleted    None           mid (the original event loses its content)
    delivery             message_delivered  None           mids, watermark
    read                 message_read       None           watermark and/or mid
    reaction             reaction           None           mid, action, reaction, emoji
    postback             postback           postback.mid   payload, title, referral?
    referral             referral           None           ref, source, type, ...
    optin                optin              None           type, payload, ref, ...
    message_edit         message_edited     None           mid, text, num_edit

Ids become strings (numbers are exact ints first, never floats); timestamps become
milliseconds (a value below 10**11 is in seconds; numeric strings are read as numbers); an item
without a timestamp takes a delivery's watermark, else the entry's time. The contact is the
sender, except for echoes (the recipient). Items are attributed to the entry's page id,
whatever their sender/recipient say. Items of an unknown kind (handovers, app_roles, payments,
policy notices, ...), items without a contact PSID (a checkbox opt-in knows only a
``user_ref``) and ``changes[]`` pings are counted in ``ParsedWebhook.unknown``, never an error.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from core.records import (
    MESSAGE_EVENT_TYPES,
    ConversationRecord,
    EventRecord,
    attachment_label,
    is_newer_message,
)
from schema.webhook import (
    INT64_MAX,
    Entry,
    Envelope,
    Message,
    MessagingItem,
    Referral,
    WebhookBody,
)

_envelope_decoder = msgspec.json.Decoder(Envelope)
_entries_decoder = msgspec.json.Decoder(list[Entry])
_item_decoder = msgspec.json.Decoder(MessagingItem)

# A timestamp below this is in seconds (10**11 ms is 1973; 10**11 s is the year 5138).
SECONDS_BELOW = 10**11
# Digits of the largest int64: a longer numeric string cannot fit (and int() of a huge one costs).
_INT64_DIGITS = len(str(INT64_MAX))
_PATH_SUFFIX = re.compile(r" - at `\$(?P<rest>[^`]*)`$")


class InvalidWebhook(ValueError):
    """The body does not parse, or is not shaped like a webhook body; the message says why and where."""


class _Unreadable(Exception):
    """An item that cannot be read; the message ends with its JSON path."""


class ParsedWebhook(msgspec.Struct, kw_only=True):
    """What a webhook body brings.

    ``items``: one record per (facebook page id, contact). ``pages``: the facebook page ids
    whose entries carry messaging or standby items (readable or not, of any kind): the body
    is for those pages. ``unsent``: (facebook page id, contact, mid) of messages the user
    unsent, whose stored event loses its content. ``unknown``: items of a kind not stored or
    naming no contact. ``skipped``: items that could not be read, each ``reason - at `path```.
    """

    object: str = "page"
    items: list[tuple[str, ConversationRecord]] = []
    pages: list[str] = []
    unsent: list[tuple[str, str, str]] = []
    unknown: int = 0
    skipped: list[str] = []


def decode_webhook(body: bytes) -> WebhookBody:
    """Decode the body's shape: the envelope and, for ``page`` bodies, its entries.

    Items stay raw (``webhook_records`` reads them one by one). Raises ``msgspec.DecodeError``
    for bytes that are not JSON, and its subclass ``msgspec.ValidationError`` for JSON of the
    wrong shape (the message ends with the JSON path, e.g. ``- at `$.entry[0].id```);
    ``RecursionError`` for JSON nested too deeply.
    """
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.ValidationError as exc:  # msgspec names no path for the root: say `$`
        raise msgspec.ValidationError(relocate(str(exc), "$")) from None
    if envelope.object != "page":
        return WebhookBody(object=envelope.object)
    try:
        entries = _entries_decoder.decode(envelope.entry)
    except msgspec.ValidationError as exc:
        raise msgspec.ValidationError(relocate(str(exc), "$.entry")) from None
    return WebhookBody(object="page", entry=entries)


def read_webhook(body: bytes) -> ParsedWebhook:
    """Read a raw body: its records, or ``InvalidWebhook`` when the body itself is unreadable."""
    try:
        decoded = decode_webhook(body)
    except msgspec.ValidationError as exc:
        raise InvalidWebhook(f"Invalid webhook body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidWebhook(f"Malformed webhook body: {exc}") from None
    except RecursionError:  # msgspec refuses deep nesting this way; it must not escape
        raise InvalidWebhook("Malformed webhook body: JSON nested too deeply - at `$`") from None
    return webhook_records(decoded)


def relocate(message: str, prefix: str) -> str:
    """Rewrite msgspec's ``- at `$...``` path, relative to a part of the body, to one under ``prefix``."""
    match = _PATH_SUFFIX.search(message)
    if match is None:
        return f"{message} - at `{prefix}`"
    return f"{message[: match.start()]} - at `{prefix}{match.group('rest')}`"


# ---- values as Meta sends them ---------------------------------------------------------------


def _id(value: int | str | None) -> str | None:
    # Without U+0000, as storage keeps every text (SPEC semantics 11): the ids this module
    # matches on (page lookups, unsends) must be the ones stored.
    return None if value is None else str(value).replace("\x00", "")


def _number(value: int | str, path: str) -> int:
    if isinstance(value, int):
        return value
    # ASCII digits only: str.isdigit() alone would take Unicode digits such as "١٢٣".
    if not (value.isascii() and value.isdigit()):
        raise _Unreadable(f"Expected an integer or a string of digits - at `{path}`")
    if len(value) > _INT64_DIGITS:
        raise _Unreadable(f"Integer out of range - at `{path}`")
    return int(value)


def _ms(value: int | str, path: str) -> int:
    """A timestamp in milliseconds: from ms, from seconds (below 10**11), or from a numeric string."""
    number = _number(value, path)
    if number < SECONDS_BELOW:
        number *= 1000
    if not 0 <= number <= INT64_MAX:
        raise _Unreadable(f"Timestamp out of range - at `{path}`")
    return number


def _count(value: int | str, path: str) -> int:
    number = _number(value, path)
    if not 0 <= number <= INT64_MAX:
        raise _Unreadable(f"Integer out of range - at `{path}`")
    return number


def _timestamp(item: MessagingItem, entry: Entry, path: str, entry_path: str) -> int:
    """The item's time (ms); a delivery's watermark, else the entry's time, stands in."""
    if item.timestamp is not None:
        return _ms(item.timestamp, f"{path}.timestamp")
    if item.delivery is not None and item.delivery.watermark is not None:
        return _ms(item.delivery.watermark, f"{path}.delivery.watermark")
    if entry.time is not None:
        return _ms(entry.time, f"{entry_path}.time")
    raise _Unreadable(f"Item has no `timestamp`, and no watermark or entry `time` stands in - at `{path}`")


# ---- items to events -------------------------------------------------------------------------


def _referral_dict(referral: Referral) -> dict[str, Any]:
    values = {k: v for k, v in msgspec.structs.asdict(referral).items() if v is not None}
    if "ad_id" in values:
        values["ad_id"] = str(values["ad_id"])
    return values


def _content_label(message: Message) -> str | None:
    """What a message without text shows: its attachments' label (a sticker is a sticker)."""
    types = [a.type or "attachment" for a in message.attachments or ()]
    # During Meta's sticker transition a sticker comes twice (a "sticker" and an "image").
    if message.sticker_id is not None or "sticker" in types:
        return "[sticker]"
    return attachment_label(types)


def _message_event(message: Message, ts: int) -> EventRecord:
    payload: dict[str, Any] = {}
    if message.attachments:
        attachments = []
        for a in message.attachments:
            attachment: dict[str, Any] = {"type": a.type, "payload": a.payload}
            if a.title is not None:
                attachment["title"] = a.title
            if a.url is not None:
                attachment["url"] = a.url
            attachments.append(attachment)
        payload["attachments"] = attachments
    if message.sticker_id is not None:
        payload["sticker_id"] = str(message.sticker_id)
    if message.quick_reply is not None:
        payload["quick_reply"] = {"payload": message.quick_reply.payload}
    if message.reply_to is not None:
        payload["reply_to"] = {"mid": message.reply_to.mid}
    if message.referral is not None:
        payload["referral"] = _referral_dict(message.referral)
    if message.is_echo:
        if message.app_id is not None:
            payload["app_id"] = str(message.app_id)
        if message.metadata is not None:
            payload["metadata"] = message.metadata
    if message.is_unsupported:
        payload["is_unsupported"] = True
    content = message.text
    if content is None:
        content = _content_label(message)
    return EventRecord(
        event_type="message_sent" if message.is_echo else "message_received",
        event_timestamp=ts,
        message_id=message.mid,
        content=content,
        payload=payload,
    )


def _has_known_kind(item: MessagingItem) -> bool:
    return (
        item.message is not None
        or item.message_edit is not None
        or item.reaction is not None
        or item.delivery is not None
        or item.read is not None
        or item.postback is not None
        or item.referral is not None
        or item.optin is not None
    )


def _event(item: MessagingItem, ts: int, path: str) -> EventRecord:
    """The event a readable item of a known kind carries."""
    if item.message is not None:
        message = item.message
        if message.is_deleted:
            payload: dict[str, Any] = {"mid": message.mid}
            if message.is_echo:
                payload["is_echo"] = True
            return EventRecord(event_type="message_deleted", event_timestamp=ts, payload=payload)
        return _message_event(message, ts)
    if item.message_edit is not None:
        edit = item.message_edit
        num_edit = None if edit.num_edit is None else _count(edit.num_edit, f"{path}.message_edit.num_edit")
        return EventRecord(
            event_type="message_edited",
            event_timestamp=ts,
            content=edit.text,
            payload={"mid": edit.mid, "text": edit.text, "num_edit": num_edit},
        )
    if item.reaction is not None:
        r = item.reaction
        return EventRecord(
            event_type="reaction",
            event_timestamp=ts,
            payload={"mid": r.mid, "action": r.action, "reaction": r.reaction, "emoji": r.emoji},
        )
    if item.delivery is not None:
        d = item.delivery
        payload = {"mids": list(d.mids or ())}
        if d.watermark is not None:
            payload["watermark"] = _ms(d.watermark, f"{path}.delivery.watermark")
        return EventRecord(event_type="message_delivered", event_timestamp=ts, payload=payload)
    if item.read is not None:
        read = item.read
        payload = {}
        if read.watermark is not None:
            payload["watermark"] = _ms(read.watermark, f"{path}.read.watermark")
        if read.mid is not None:
            payload["mid"] = read.mid
        return EventRecord(event_type="message_read", event_timestamp=ts, payload=payload)
    if item.postback is not None:
        p = item.postback
        payload = {"payload": p.payload, "title": p.title}
        if p.referral is not None:
            payload["referral"] = _referral_dict(p.referral)
        return EventRecord(
            event_type="postback", event_timestamp=ts, message_id=p.mid, content=p.title, payload=payload
        )
    if item.referral is not None:
        return EventRecord(event_type="referral", event_timestamp=ts, payload=_referral_dict(item.referral))
    assert item.optin is not None
    optin = {k: v for k, v in msgspec.structs.asdict(item.optin).items() if v is not None}
    for key in ("notification_messages_token", "one_time_notif_token"):
        if key in optin:
            optin[key] = str(optin[key])
    if "token_expiry_timestamp" in optin:
        expiry = optin["token_expiry_timestamp"]
        optin["token_expiry_timestamp"] = _ms(expiry, f"{path}.optin.token_expiry_timestamp")
    return EventRecord(event_type="optin", event_timestamp=ts, payload=optin)


def _contact(item: MessagingItem, page_id: str) -> str | None:
    """The user's PSID: the recipient of an echo, else the sender.

    A non-echo item sent by the page itself (the sender is the entry's page) names the
    user as its recipient; attributing it to the page would create a bogus conversation.
    """
    sender = _id(item.sender.id) if item.sender is not None else None
    recipient = _id(item.recipient.id) if item.recipient is not None else None
    if (item.message is not None and item.message.is_echo) or (sender == page_id and recipient):
        return recipient
    return sender


def _event_key(event: EventRecord) -> tuple[str, str | int]:
    # Storage's uniqueness: (type, mid) when there is a mid, else (type, timestamp).
    if event.message_id is not None:
        return (event.event_type, event.message_id)
    return (event.event_type, event.event_timestamp)


def webhook_records(body: WebhookBody) -> ParsedWebhook:
    """Read the items of a decoded body and group their events per (page id, contact).

    Events keep their arrival order (entries in order, ``messaging`` then ``standby``); an
    event repeated within the body (same storage key, e.g. the same mid twice) is kept once.
    ``last_message``/``last_message_time`` are the newest message or echo among the record's
    events (None when it has none). A body of another object than ``page`` brings nothing.
    """
    parsed = ParsedWebhook(object=body.object)
    grouped: dict[tuple[str, str], ConversationRecord] = {}
    seen: dict[tuple[str, str], set[tuple[str, str | int]]] = {}
    pages: dict[str, None] = {}
    for e_index, entry in enumerate(body.entry):
        page_id = _id(entry.id) or ""
        entry_path = f"$.entry[{e_index}]"
        parsed.unknown += len(entry.changes)  # App Dashboard pings: no messaging events
        for field, raws in (("messaging", entry.messaging), ("standby", entry.standby)):
            if raws:
                pages[page_id] = None
            for i_index, raw in enumerate(raws):
                path = f"{entry_path}.{field}[{i_index}]"
                try:
                    item = _item_decoder.decode(raw)
                    if not _has_known_kind(item):
                        parsed.unknown += 1
                        continue
                    contact = _contact(item, page_id)
                    if not contact:
                        parsed.unknown += 1
                        continue
                    event = _event(item, _timestamp(item, entry, path, entry_path), path)
                except msgspec.ValidationError as exc:
                    parsed.skipped.append(relocate(str(exc), path))
                    continue
                except _Unreadable as exc:
                    parsed.skipped.append(str(exc))
                    continue
                key = (page_id, contact)
                record = grouped.get(key)
                if record is None:
                    record = grouped[key] = ConversationRecord(sender_id=contact, events=[])
                    seen[key] = set()
                if event.event_type == "message_deleted":
                    parsed.unsent.append((page_id, contact, _id(event.payload["mid"]) or ""))
                event_key = _event_key(event)
                if event_key in seen[key]:
                    continue
                seen[key].add(event_key)
                record.events.append(event)
                if event.event_type in MESSAGE_EVENT_TYPES and (
                    record.last_message_time is None
                    or is_newer_message(
                        event.event_timestamp, event.content, record.last_message_time, record.last_message
                    )
                ):
                    record.last_message = event.content
                    record.last_message_time = event.event_timestamp
    parsed.items = [(page, record) for (page, _), record in grouped.items()]
    parsed.pages = list(pages)
    return parsed
