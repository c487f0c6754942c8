"""What sync and webhooks both produce: normalized conversation and event records.

The sync engine (from Graph conversations) and the webhook applier (from Messenger
webhook items) each turn their input into these records; storage writes them with one
piece of code, so both sources converge on the same rows:

* a conversation is keyed by (page row, ``sender_id``), the contact's page-scoped id (PSID);
* an event is keyed by (conversation, ``event_type``, ``message_id``) when it has a mid,
  else by (conversation, ``event_type``, ``event_timestamp``).
"""

from __future__ import annotations

from typing import Any

import msgspec

EVENT_TYPES = frozenset(
    {
        "message_received",
        "message_sent",
        "message_delivered",
        "message_read",
        "reaction",
        "postback",
        "referral",
        "optin",
        "message_edited",
        "message_deleted",  # an unsend: the original message event keeps its row, loses its content
    }
)

# Event types that are messages: they count in message_count and may move last_message.
MESSAGE_EVENT_TYPES = frozenset({"message_received", "message_sent"})


def is_newer_message(time: int, text: str | None, than_time: int, than_text: str | None) -> bool:
    """Whether a message at `time` replaces the one at `than_time` as a conversation's last message.

    A later time wins; at the same time (two messages in one millisecond, or one Graph second) the
    greater text does, so the last message never depends on the order messages arrive in.
    """
    if time != than_time:
        return time > than_time
    return (text is not None, text or "") > (than_text is not None, than_text or "")


class EventRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One row of contact_interaction_events, before it has a conversation id."""

    event_type: str
    event_timestamp: int  # milliseconds since the epoch
    message_id: str | None = None  # the event's own mid; None for reactions, edits, reads, ...
    content: str | None = None  # the message text, postback title, ... (human readable)
    payload: dict[str, Any] = msgspec.field(default_factory=dict)  # JSON-serializable detail


class ConversationRecord(msgspec.Struct, kw_only=True):
    """What one source knows about one conversation, with the events it brings.

    ``None`` means "this source does not know": storage keeps what is stored. Counts
    given as numbers (sync, from Graph) replace the stored ones; when ``message_count``
    is None (webhooks) storage adds the number of newly inserted message events.
    ``last_message``/``last_message_time`` only ever move forwards in time.
    """

    sender_id: str  # the contact's PSID: the participant who is not the page
    events: list[EventRecord]
    facebook_conversation_id: str | None = None  # "t_..." (known to sync only)
    sender_name: str | None = None
    last_message: str | None = None
    last_message_time: int | None = None  # milliseconds since the epoch
    message_count: int | None = None
    unread_count: int | None = None


def attachment_label(types: list[str]) -> str | None:
    """A readable stand-in for a message without text: ``[image]``, ``[2 files]``...

    Sync and webhooks label the same message the same way, so whichever stores it first,
    its content reads alike.
    """
    if not types:
        return None
    if len(types) == 1:
        return f"[{types[0] or 'attachment'}]"
    if len(set(types)) == 1 and types[0]:
        return f"[{len(types)} {types[0]}s]"
    return f"[{len(types)} attachments]"
