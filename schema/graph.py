"""The Graph API conversations listing, its error body and its usage headers, as msgspec structs.

    GET /{page-id}/conversations?platform=messenger&fields=...   (see ``CONVERSATION_FIELDS``)

    ConversationList             {"data": [Raw, ...], "paging": Paging}
    ├── Conversation             id "t_...", updated_time, counts, participants, messages
    │   ├── ParticipantEdge      {"data": [Participant]}
    │   └── MessageEdge          {"data": [Message]}: the 20 most recent, newest first
    └── Paging                   {"cursors": {"before", "after"}, "next"}: the next page's cursor is
                                 cursors.after, else the ``after`` of the ``next`` URL (never followed)
    GraphErrorBody               {"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}
    AppUsage, BusinessUseCaseUsage   X-App-Usage / X-Page-Usage, X-Business-Use-Case-Usage

Only the fields the service uses are declared; unknown fields are ignored. Times such as
``2025-06-01T12:00:00+0000`` decode to timezone-aware datetimes (msgspec accepts the
``+0000`` offset; a time without an offset is rejected). ``decode_conversation_list``
validates each conversation on its own, so one bad record is skipped and reported with
its JSON path (``$.data[3].messages.data[0].created_time``) while the rest of the page is kept.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import msgspec

CONVERSATION_FIELDS = (
    "id,updated_time,message_count,unread_count,participants,"
    "messages.limit(20){id,created_time,from,to,message,attachments}"
)

GraphTime = Annotated[datetime, msgspec.Meta(tz=True)]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


class _Struct(msgspec.Struct, kw_only=True, gc=False):
    # Decoded responses hold no reference cycles: skipping GC tracking makes decoding cheaper.
    pass


class Participant(_Struct):
    """A party to the conversation: the page itself, or a contact (``id`` is the PSID)."""

    id: str
    name: str | None = None
    email: str | None = None


class ParticipantEdge(_Struct):
    """The ``participants`` / ``to`` edge."""

    data: list[Participant] = msgspec.field(default_factory=list)


class AttachmentEdge(_Struct):
    """The ``attachments`` edge; each attachment is kept as plain JSON (it is stored as is)."""

    data: list[dict[str, Any]] = msgspec.field(default_factory=list)


class Message(_Struct):
    """One message; ``message`` is the text (Graph sends ``""`` for attachment-only messages)."""

    id: str  # "m_..."
    created_time: GraphTime
    from_: Participant = msgspec.field(name="from")
    to: ParticipantEdge = msgspec.field(default_factory=ParticipantEdge)
    message: str | None = None
    attachments: AttachmentEdge | None = None

    @property
    def created_time_ms(self) -> int:
        """``created_time`` in milliseconds since the epoch."""
        return datetime_to_ms(self.created_time)


class MessageEdge(_Struct):
    """The ``messages`` edge: the conversation's most recent messages, newest first."""

    data: list[Message] = msgspec.field(default_factory=list)


class Conversation(_Struct):
    """One conversation of the page's inbox."""

    id: str  # "t_..."
    updated_time: GraphTime
    message_count: int | None = None
    unread_count: int | None = None
    participants: ParticipantEdge = msgspec.field(default_factory=ParticipantEdge)
    messages: MessageEdge = msgspec.field(default_factory=MessageEdge)

    @property
    def updated_time_ms(self) -> int:
        """``updated_time`` in milliseconds since the epoch."""
        return datetime_to_ms(self.updated_time)


class Cursors(_Struct):
    """Opaque cursors around the current page."""

    before: str | None = None
    after: str | None = None


class Paging(_Struct):
    """Paging of a listing; ``next`` is absent on the last page."""

    cursors: Cursors | None = None
    next: str | None = None
    previous: str | None = None


class _Envelope(_Struct):
    data: list[msgspec.Raw]
    paging: Paging | None = None


class ConversationList(_Struct):
    """A decoded listing page: the valid conversations and the (json_path, error) of skipped ones."""

    conversations: list[Conversation]
    skipped: list[tuple[str, str]]
    paging: Paging | None = None

    @property
    def has_next(self) -> bool:
        """Whether Graph says a next page exists (``paging.next``)."""
        return self.paging is not None and bool(self.paging.next)

    @property
    def next_cursor(self) -> str | None:
        """The ``after`` cursor of the next page when Graph says one exists, else None.

        From ``paging.cursors.after``, else from the ``after`` parameter of the ``next`` URL
        (only read, never followed: it may point anywhere, and carries a token). None with
        ``has_next`` means Graph gave no way forward.
        """
        if self.paging is None or not self.paging.next:
            return None
        if self.paging.cursors is not None and self.paging.cursors.after:
            return self.paging.cursors.after
        return after_of_url(self.paging.next)


def after_of_url(url: str) -> str | None:
    """The ``after`` query parameter of a URL, or None (also for a string that is not a URL)."""
    try:
        values = parse_qs(urlsplit(url).query).get("after", [])
    except ValueError:
        return None
    return next((value for value in values if value), None)


class GraphErrorDetail(_Struct):
    """The ``error`` object of a failed Graph call."""

    code: int
    message: str = ""
    type: str | None = None
    error_subcode: int | None = None
    is_transient: bool | None = None
    fbtrace_id: str | None = None


class GraphErrorBody(_Struct):
    """``{"error": {...}}``, the body of every failed Graph call."""

    error: GraphErrorDetail


class AppUsage(_Struct):
    """X-App-Usage / X-Page-Usage: percentages of the rolling-hour allowance used."""

    call_count: float = 0
    total_time: float = 0
    total_cputime: float = 0

    @property
    def percent(self) -> float:
        """The highest of the three percentages."""
        return max(self.call_count, self.total_time, self.total_cputime)


class BusinessUseCaseUsage(AppUsage):
    """One entry of X-Business-Use-Case-Usage; the wait is in minutes."""

    type: str | None = None
    estimated_time_to_regain_access: float = 0


class EnvelopeError(ValueError):
    """The body is not a Graph listing at all (not JSON, or no ``data`` list)."""


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_conversation_decoder = msgspec.json.Decoder(Conversation)
_error_decoder = msgspec.json.Decoder(GraphErrorBody)
_app_usage_decoder = msgspec.json.Decoder(AppUsage)
_buc_usage_decoder = msgspec.json.Decoder(dict[str, list[BusinessUseCaseUsage]])

# msgspec ends its message with " - at `$.path`" when the error is below the root.
_PATH_SUFFIX = re.compile(r" - at `\$(?P<rest>[^`]*)`$")


def decode_conversation_list(body: bytes) -> ConversationList:
    """Decode a listing page, validating each conversation on its own.

    Raises ``EnvelopeError`` when the body is not JSON or has no ``data`` list.
    """
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise EnvelopeError(f"Unexpected Graph response: {exc}") from None
    conversations: list[Conversation] = []
    skipped: list[tuple[str, str]] = []
    for index, raw in enumerate(envelope.data):
        try:
            conversations.append(_conversation_decoder.decode(raw))
        except msgspec.ValidationError as exc:
            skipped.append(_relocate(str(exc), f"$.data[{index}]"))
    return ConversationList(conversations=conversations, skipped=skipped, paging=envelope.paging)


def _relocate(message: str, prefix: str) -> tuple[str, str]:
    """Rewrite msgspec's record-relative ``$...`` path to one under ``prefix``."""
    match = _PATH_SUFFIX.search(message)
    if match is None:
        return prefix, f"{message} - at `{prefix}`"
    path = prefix + match.group("rest")
    return path, f"{message[: match.start()]} - at `{path}`"


def decode_error(body: bytes) -> GraphErrorDetail | None:
    """The ``error`` object of a Graph error body, or None when the body is not one."""
    try:
        return _error_decoder.decode(body).error
    except msgspec.DecodeError:
        return None


def decode_app_usage(header: str | None) -> AppUsage | None:
    """Parse an X-App-Usage / X-Page-Usage header; None when absent or malformed."""
    if not header:
        return None
    try:
        return _app_usage_decoder.decode(header)
    except msgspec.DecodeError:
        return None


def decode_business_usage(header: str | None) -> list[BusinessUseCaseUsage]:
    """Parse X-Business-Use-Case-Usage (``{id: [entry, ...]}``) into a flat list of entries."""
    if not header:
        return []
    try:
        by_id = _buc_usage_decoder.decode(header)
    except msgspec.DecodeError:
        return []
    return [entry for entries in by_id.values() for entry in entries]


def datetime_to_ms(value: datetime) -> int:
    """Milliseconds since the epoch of an aware datetime, exactly (no float rounding)."""
    return (value - _EPOCH) // _MILLISECOND


def parse_graph_time(value: str) -> int:
    """Parse a Graph time such as ``2025-06-01T12:00:00+0000`` to milliseconds since the epoch.

    Raises ``ValueError`` for a malformed time or one without a UTC offset.
    """
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"Graph time without a UTC offset: {value!r}")
    return datetime_to_ms(parsed)
