"""The Messenger Platform webhook body, as msgspec structs, read the way Meta really sends it.

    Envelope                     {"object": "page", "entry": Raw}: the outer shape, any object
    └── Entry                    one page: id, time, messaging[Raw], standby[Raw], changes[Raw]
        └── MessagingItem        decoded item by item: sender, recipient, timestamp and one kind:
                                 message | delivery | read | reaction | postback |
                                 referral | optin | message_edit

The body is read in layers, so that what cannot be read is as small as possible (SPEC
semantics 10): the envelope and the entries are the body's shape (a failure there makes the
whole body ``invalid``); each item of ``messaging``/``standby`` is kept as ``msgspec.Raw`` and
decoded on its own by ``webhook.parse``, so one unreadable item is skipped and the rest applied.
Objects other than ``page`` are not read past the envelope.

Leniency, because bodies in the wild differ from the reference pages:

* ids (``Id``) may be JSON numbers or strings; numbers decode as ``int`` (exact, never a float,
  even above 2**53) and ``webhook.parse`` turns them into strings; an int beyond int64 is refused;
* timestamps (``Timestamp``) may be integers (milliseconds, or seconds below 10**11) or numeric
  strings; ``webhook.parse`` turns them into milliseconds and refuses what does not fit int64;
* every event field is optional, so an item of a kind not listed above (``pass_thread_control``,
  ``app_roles``, ``payment``, ``policy_enforcement``, ...) still decodes, and is counted as unknown.

Only the fields the service uses are declared; unknown fields are ignored, so Meta may add
fields freely. Free-form detail (attachment payloads, ad context) is kept as plain JSON values
so it can be stored as is. Validation errors carry msgspec's JSON path, e.g.
``Expected `str`, got `int` - at `$.entry[0].messaging[1].message.text```.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

INT64_MAX = 2**63 - 1

# An id as Meta sends it: a string, or a JSON number (decoded as an exact int within int64).
Id = Annotated[int, msgspec.Meta(ge=-(2**63), le=INT64_MAX)] | str
# A timestamp as Meta sends it: ms or s as an integer (never negative), or a numeric string.
Timestamp = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] | str
# A count (``num_edit``): an integer or a numeric string.
Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] | str


class _Struct(msgspec.Struct, kw_only=True, gc=False):
    # Decoded bodies hold no reference cycles: untracked by the GC, they decode faster.
    pass


class Envelope(_Struct):
    """The outer shape of ``POST /api/webhook``: ``entry`` is read only for ``page`` bodies."""

    object: str
    entry: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"[]"))


class Entry(_Struct):
    """Events of one page: ``messaging`` for the thread owner, ``standby`` otherwise.

    ``changes`` carries the App Dashboard's test pings (``{"field": "messages", ...}``), which
    are no messaging events. ``time`` is only a stand-in for items without a timestamp, so it
    is read leniently (an unreadable ``time`` skips those items, not the body).
    """

    id: Id  # the Facebook page id
    time: int | str | None = None
    messaging: list[msgspec.Raw] = msgspec.field(default_factory=list)
    standby: list[msgspec.Raw] = msgspec.field(default_factory=list)
    changes: list[msgspec.Raw] = msgspec.field(default_factory=list)


class WebhookBody(_Struct):
    """A body whose shape was read: its object and, for ``page`` bodies, its entries."""

    object: str
    entry: list[Entry] = msgspec.field(default_factory=list)


class Party(_Struct):
    """A sender or recipient: a PSID or page id, or a ``user_ref`` (checkbox plugin)."""

    id: Id | None = None
    user_ref: str | None = None


class Attachment(_Struct):
    """One attachment: image, audio, video, file, location, fallback, template, sticker, ...

    ``payload`` is kept as sent (a url, coordinates, a template, a ``sticker_id``, ...); older
    fallback attachments carry ``title`` and ``url`` beside it.
    """

    type: str | None = None
    payload: dict[str, Any] | None = None
    title: str | None = None
    url: str | None = None


class QuickReply(_Struct):
    """The quick reply the user tapped."""

    payload: str | None = None


class ReplyTo(_Struct):
    """The message this one replies to."""

    mid: str | None = None


class Referral(_Struct):
    """How the user reached the conversation (m.me link, ad, plugin, ...)."""

    ref: str | None = None
    source: str | None = None
    type: str | None = None
    ad_id: Id | None = None
    referer_uri: str | None = None
    is_guest_user: bool | None = None
    ads_context_data: dict[str, Any] | None = None


class Message(_Struct):
    """A message from the user, or (``is_echo``) one the page sent; ``is_deleted``: an unsend."""

    mid: str
    text: str | None = None
    is_echo: bool = False
    app_id: Id | None = None
    metadata: str | None = None
    sticker_id: Id | None = None
    attachments: list[Attachment] | None = None
    quick_reply: QuickReply | None = None
    reply_to: ReplyTo | None = None
    referral: Referral | None = None
    is_deleted: bool = False
    is_unsupported: bool = False


class Delivery(_Struct):
    """Messages delivered: every message before ``watermark`` was delivered."""

    watermark: Timestamp | None = None
    mids: list[str] | None = None


class Read(_Struct):
    """Messages read: every message before ``watermark`` was read (some bodies carry a ``mid``)."""

    watermark: Timestamp | None = None
    mid: str | None = None


class Reaction(_Struct):
    """A reaction to the message ``mid`` (``react``), or its withdrawal (``unreact``).

    ``action`` stays a plain string so that a new action does not reject the item.
    """

    mid: str
    action: str
    reaction: str | None = None
    emoji: str | None = None


class Postback(_Struct):
    """A tapped button (Get Started, persistent menu, template button).

    On ``standby[]`` Meta sends postbacks without their ``payload``.
    """

    mid: str | None = None
    title: str | None = None
    payload: str | None = None
    referral: Referral | None = None


class Optin(_Struct):
    """An opt-in: checkbox / send-to-Messenger plugin or notification messages."""

    type: str | None = None
    payload: str | None = None
    ref: str | None = None
    user_ref: str | None = None
    title: str | None = None
    notification_messages_token: Id | None = None
    notification_messages_frequency: str | None = None
    notification_messages_timezone: str | None = None
    notification_messages_status: str | None = None
    token_expiry_timestamp: Timestamp | None = None
    user_token_status: str | None = None
    one_time_notif_token: Id | None = None


class MessageEdit(_Struct):
    """An edited message: its mid, the new text and how many times it was edited."""

    mid: str
    text: str | None = None
    num_edit: Count | None = None


class MessagingItem(_Struct):
    """One item of ``messaging`` or ``standby``; at most one event field is set.

    ``timestamp`` may be missing (Meta's own delivery example has none): a delivery's
    ``watermark``, else the entry's ``time``, stands in.
    """

    timestamp: Timestamp | None = None
    sender: Party | None = None
    recipient: Party | None = None
    message: Message | None = None
    delivery: Delivery | None = None
    read: Read | None = None
    reaction: Reaction | None = None
    postback: Postback | None = None
    referral: Referral | None = None
    optin: Optin | None = None
    message_edit: MessageEdit | None = None
