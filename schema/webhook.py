"""The Messenger Platform webhook body, as msgspec structs.

    WebhookBody                  {"object": "page", "entry": [...]}
    └── Entry                    one page: id, time, messaging[], standby[]
        └── MessagingItem        sender, recipient, timestamp and one event kind:
                                 message | delivery | read | reaction | postback |
                                 referral | optin | message_edit

Only the fields the service uses are declared; unknown fields are ignored, so Meta may
add fields freely. An item of a kind not listed above (``pass_thread_control``, ...)
still validates: every kind is optional, and ``webhook.parse`` counts such items.
Free-form detail (attachment payloads, ad context) is kept as plain JSON values so it
can be stored as is. Validation errors carry msgspec's JSON path, e.g.
``Expected `int`, got `str` - at `$.entry[0].messaging[1].timestamp```.
"""

from __future__ import annotations

from typing import Any

import msgspec


class _Struct(msgspec.Struct, kw_only=True, gc=False):
    # Decoded bodies hold no reference cycles: untracked by the GC, they decode faster.
    pass


class Party(_Struct):
    """A sender or recipient: a PSID or page id, or a ``user_ref`` (checkbox plugin)."""

    id: str | None = None
    user_ref: str | None = None


class Attachment(_Struct):
    """One attachment: ``type`` is image, video, audio, file, template, fallback, ..."""

    type: str
    payload: dict[str, Any] | None = None


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
    ad_id: str | None = None
    referer_uri: str | None = None
    is_guest_user: bool | None = None
    ads_context_data: dict[str, Any] | None = None


class Message(_Struct):
    """A message from the user, or (``is_echo``) one the page sent."""

    mid: str
    text: str | None = None
    is_echo: bool = False
    app_id: int | str | None = None
    metadata: str | None = None
    attachments: list[Attachment] | None = None
    quick_reply: QuickReply | None = None
    reply_to: ReplyTo | None = None
    referral: Referral | None = None
    is_deleted: bool = False
    is_unsupported: bool = False


class Delivery(_Struct):
    """Messages delivered: every message before ``watermark`` (ms) was delivered."""

    watermark: int
    mids: list[str] | None = None


class Read(_Struct):
    """Messages read: every message before ``watermark`` (ms) was read."""

    watermark: int


class Reaction(_Struct):
    """A reaction to the message ``mid`` (``react``), or its withdrawal (``unreact``).

    ``action`` stays a plain string so that a new action does not reject the body.
    """

    mid: str
    action: str
    reaction: str | None = None
    emoji: str | None = None


class Postback(_Struct):
    """A tapped button (Get Started, persistent menu, template button)."""

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
    notification_messages_token: str | None = None
    notification_messages_frequency: str | None = None
    notification_messages_timezone: str | None = None
    notification_messages_status: str | None = None
    token_expiry_timestamp: int | None = None
    user_token_status: str | None = None
    one_time_notif_token: str | None = None


class MessageEdit(_Struct):
    """An edited message: its mid, the new text and how many times it was edited."""

    mid: str
    text: str | None = None
    num_edit: int | None = None


class MessagingItem(_Struct):
    """One item of ``messaging`` or ``standby``; at most one event field is set."""

    timestamp: int  # milliseconds since the epoch
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


class Entry(_Struct):
    """Events of one page: ``messaging`` for the thread owner, ``standby`` otherwise."""

    id: str  # the Facebook page id
    time: int | None = None  # milliseconds since the epoch
    messaging: list[MessagingItem] = msgspec.field(default_factory=list)
    standby: list[MessagingItem] = msgspec.field(default_factory=list)


class WebhookBody(_Struct):
    """The body of ``POST /api/webhook``."""

    object: str
    entry: list[Entry] = msgspec.field(default_factory=list)
