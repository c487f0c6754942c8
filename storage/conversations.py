"""The write path that sync and webhooks share: records in, rows out, set-based.

`write_records` upserts a batch of conversation records and their events for one page row
inside the caller's transaction: one statement per table per batch (never an `await` per row),
events deduplicated by the unique indexes, stored conversations updated by compare-and-set on
`version` (re-read and retried on conflict), and a conversation the merge does not change
keeps its version. Time never moves backwards: `last_message` changes only for a newer one.

Text the database cannot hold (SPEC semantics 11): PostgreSQL's text and jsonb refuse U+0000,
so every text this path writes (ids, names, messages, the strings of an event's JSON payload)
is stored with U+0000 removed, on both engines alike, before records are merged and keyed.
Finding none costs one scan of each string (the payload: of its encoded JSON).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import msgspec

from core.records import MESSAGE_EVENT_TYPES, ConversationRecord, EventRecord, is_newer_message
from storage.base import WriteCounts
from storage.engine import Conn
from storage.notify import EVENTS

# A conflicting version-checked update is retried this many times before giving up.
CAS_ATTEMPTS = 8

_json_encode = msgspec.json.Encoder().encode

NUL = "\x00"
_ENCODED_NUL = "\\u0000"  # how msgspec writes U+0000 inside a JSON string


def without_nul(text: str | None) -> str | None:
    """`text` with U+0000 removed (None stays None); the same object when it has none."""
    if text is None or NUL not in text:
        return text
    return text.replace(NUL, "")


def _json_without_nul(value: Any) -> Any:
    """A JSON value (builtins) with U+0000 removed from every string, keys included."""
    if isinstance(value, str):
        return value.replace(NUL, "")
    if isinstance(value, dict):
        return {
            (k.replace(NUL, "") if isinstance(k, str) else k): _json_without_nul(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_json_without_nul(v) for v in value]
    return value


def encode_payload(payload: Any) -> str:
    """An event's payload as JSON text that PostgreSQL's jsonb accepts (no U+0000 escape)."""
    encoded = _json_encode(payload).decode()
    if _ENCODED_NUL in encoded:  # rare (or a literal backslash-u0000 text): only then walk it
        encoded = _json_encode(_json_without_nul(msgspec.to_builtins(payload))).decode()
    return encoded


def _event_has_nul(event: EventRecord) -> bool:
    return bool((event.message_id and NUL in event.message_id) or (event.content and NUL in event.content))


def _record_has_nul(rec: ConversationRecord) -> bool:
    # Plain loops, no generator per record: this runs over every event of every sync page.
    if NUL in rec.sender_id:
        return True
    for text in (rec.facebook_conversation_id, rec.sender_name, rec.last_message):
        if text and NUL in text:
            return True
    for e in rec.events:
        if (e.message_id and NUL in e.message_id) or (e.content and NUL in e.content):
            return True
    return False


def _record_without_nul(rec: ConversationRecord) -> ConversationRecord:
    events = [
        msgspec.structs.replace(e, message_id=without_nul(e.message_id), content=without_nul(e.content))
        if _event_has_nul(e)
        else e
        for e in rec.events
    ]
    return msgspec.structs.replace(
        rec,
        sender_id=rec.sender_id.replace(NUL, ""),
        facebook_conversation_id=without_nul(rec.facebook_conversation_id),
        sender_name=without_nul(rec.sender_name),
        last_message=without_nul(rec.last_message),
        events=events,
    )


def records_without_nul(records: Sequence[ConversationRecord]) -> Sequence[ConversationRecord]:
    """The records with U+0000 removed from their text; the same sequence when none has any.

    The callers' records are never changed: only those holding a U+0000 are copied.
    """
    if not any(_record_has_nul(rec) for rec in records):
        return records
    return [_record_without_nul(rec) if _record_has_nul(rec) else rec for rec in records]


def _event_key(event: EventRecord) -> tuple[str, str | int]:
    """The identity the unique indexes enforce: the mid if there is one, else the timestamp."""
    if event.message_id is not None:
        return (event.event_type, event.message_id)
    return (event.event_type, event.event_timestamp)


def _unique_events(events: list[EventRecord]) -> list[EventRecord]:
    """The events without repeats (first one wins); the same list when there are none."""
    keys = [_event_key(e) for e in events]
    if len(set(keys)) == len(keys):
        return events
    seen: dict[tuple[str, str | int], EventRecord] = {}
    for key, event in zip(keys, events, strict=True):
        seen.setdefault(key, event)
    return list(seen.values())


def _count_messages(events: Sequence[EventRecord]) -> int:
    return sum(e.event_type in MESSAGE_EVENT_TYPES for e in events)


def _count_received(events: Sequence[EventRecord]) -> int:
    return sum(e.event_type == "message_received" for e in events)


def _merge_into(have: ConversationRecord, rec: ConversationRecord) -> None:
    """Merge a later record of the same contact into `have` (newest message wins)."""
    have.events.extend(rec.events)
    have.facebook_conversation_id = rec.facebook_conversation_id or have.facebook_conversation_id
    have.sender_name = rec.sender_name or have.sender_name
    if rec.message_count is not None:
        have.message_count = rec.message_count
    if rec.unread_count is not None:
        have.unread_count = rec.unread_count
    if rec.last_message_time is not None and (
        have.last_message_time is None
        or is_newer_message(
            rec.last_message_time, rec.last_message, have.last_message_time, have.last_message
        )
    ):
        have.last_message, have.last_message_time = rec.last_message, rec.last_message_time


def _merge_records(records: Sequence[ConversationRecord]) -> dict[str, ConversationRecord]:
    """One record per contact, events deduplicated, fields merged (newest message wins).

    The callers' records are never changed: a record is copied only when it must be
    (a second record of its contact, or repeated events), which a page of distinct
    conversations never needs.
    """
    merged: dict[str, ConversationRecord] = {}
    copied: set[str] = set()
    for rec in records:
        have = merged.get(rec.sender_id)
        if have is None:
            merged[rec.sender_id] = rec
            continue
        if rec.sender_id not in copied:
            have = merged[rec.sender_id] = msgspec.structs.replace(have, events=list(have.events))
            copied.add(rec.sender_id)
        _merge_into(have, rec)
    out: dict[str, ConversationRecord] = {}
    for sid in sorted(merged):  # one order for every writer: fewer lock cycles
        rec = merged[sid]
        events = _unique_events(rec.events)
        out[sid] = rec if events is rec.events else msgspec.structs.replace(rec, events=events)
    return out


CONVERSATION_COLUMNS = (
    "id, page_id, facebook_conversation_id, sender_id, sender_name, last_message, "
    "last_message_time, message_count, unread_count, version, created_at, updated_at"
)
CONVERSATION_COLUMNS_C = ", ".join("c." + c.strip() for c in CONVERSATION_COLUMNS.split(","))
MUTABLE = (
    "facebook_conversation_id",
    "sender_name",
    "last_message",
    "last_message_time",
    "message_count",
    "unread_count",
)


def _merged_values(
    row: Any, rec: ConversationRecord, new_messages: int, new_received: int
) -> tuple[Any, ...]:
    """The row's mutable fields (in `MUTABLE` order) after merging a record into it.

    Time never moves backwards. A tuple, not a dict: this runs once per stored contact of
    every webhook batch.
    """
    last_message, last_message_time = row["last_message"], row["last_message_time"]
    if rec.last_message_time is not None and is_newer_message(
        rec.last_message_time, rec.last_message, last_message_time, last_message
    ):
        last_message, last_message_time = rec.last_message, rec.last_message_time
    return (
        rec.facebook_conversation_id or row["facebook_conversation_id"],
        rec.sender_name or row["sender_name"],
        last_message,
        last_message_time,
        rec.message_count if rec.message_count is not None else row["message_count"] + new_messages,
        rec.unread_count if rec.unread_count is not None else row["unread_count"] + new_received,
    )


def _stored_values(row: Any) -> tuple[Any, ...]:
    """The row's mutable fields, in `MUTABLE` order."""
    return (
        row["facebook_conversation_id"],
        row["sender_name"],
        row["last_message"],
        row["last_message_time"],
        row["message_count"],
        row["unread_count"],
    )


async def select_conversations(conn: Conn, page_id: str, sender_ids: Sequence[str]) -> dict[str, Any]:
    # A join on the ids (not `IN`/`ANY`) lets PostgreSQL probe the (page_id, sender_id)
    # index. Until autovacuum has analyzed a fresh table it may still scan the page's rows,
    # which is one reason a first sync inserts before it looks (see `write_records`).
    source, args = conn.rows(("text",), [(sid,) for sid in sender_ids], 2)
    rows = await conn.fetch(
        f"WITH s (sid) AS ({source}) SELECT {CONVERSATION_COLUMNS_C} FROM s "
        "JOIN messenger_conversations c ON c.page_id = $1 AND c.sender_id = s.sid",
        page_id,
        *args,
    )
    return {r["sender_id"]: r for r in rows}


async def write_records(
    conn: Conn, page_id: str, records: Sequence[ConversationRecord], *, expect_new: bool = False
) -> WriteCounts:
    """Upsert records and their events with set-based statements; version-checked updates.

    `expect_new` (sync pages: a first sync brings only new contacts) skips looking for
    stored conversations before inserting: the insert finds the ones that exist, and only
    those are read. Otherwise (webhooks, whose contacts are mostly known) stored ones are
    read first and only the rest inserted.
    """
    counts = WriteCounts()
    # Before merging: ids that differ only by a U+0000 are the same contact, the same event.
    merged = _merge_records(records_without_nul(records))
    if not merged:
        return counts
    existing = {} if expect_new else await select_conversations(conn, page_id, list(merged))
    new = [rec for sid, rec in merged.items() if sid not in existing]
    ids = await _insert_conversations(conn, page_id, new) if new else {}
    counts.inserted = len(ids)
    stored = [rec.sender_id for rec in new if rec.sender_id not in ids]
    if stored:  # inserted by another transaction since we looked, or expected new: merge into it
        existing.update(await select_conversations(conn, page_id, stored))
    # A conversation created here has no stored events (no other transaction can see it
    # yet), so its events need no conflict check: a plain INSERT spares PostgreSQL's
    # speculative insertion. Which events were new matters only to a stored conversation
    # whose record leaves a count to us (webhooks); a sync's records bring both from Graph.
    created = [(ids[rec.sender_id], rec) for rec in new if rec.sender_id in ids]
    counts.events_inserted, _ = await _insert_events(conn, page_id, created, stored=False)
    if existing:
        targets = [(existing[sid]["id"], rec) for sid, rec in merged.items() if sid in existing]
        per_conversation = any(r.message_count is None or r.unread_count is None for _, r in targets)
        n, inserted = await _insert_events(
            conn, page_id, targets, stored=True, per_conversation=per_conversation
        )
        counts.events_inserted += n
        await _update_conversations(conn, page_id, merged, existing, inserted, counts)
    if counts.events_inserted:
        conn.notify(EVENTS, page_id)  # the page's event streams, on every replica
    return counts


async def _insert_conversations(
    conn: Conn, page_id: str, records: Sequence[ConversationRecord]
) -> dict[str, int]:
    """Insert conversations not stored yet: {sender_id: id} of those this call created.

    A new conversation's events are all new, so its counts are known now.
    """
    source, args = conn.rows(
        ("text", "text", "text", "text", "text", "bigint", "int", "int"),
        [
            (
                page_id,
                rec.sender_id,
                rec.facebook_conversation_id,
                rec.sender_name,
                rec.last_message,
                rec.last_message_time or 0,
                rec.message_count if rec.message_count is not None else _count_messages(rec.events),
                rec.unread_count if rec.unread_count is not None else _count_received(rec.events),
            )
            for rec in records
        ],
        1,
    )
    rows = await conn.fetch(
        "INSERT INTO messenger_conversations (page_id, sender_id, facebook_conversation_id, "
        "sender_name, last_message, last_message_time, message_count, unread_count) "
        f"{source} ON CONFLICT (page_id, sender_id) DO NOTHING RETURNING id, sender_id",
        *args,
    )
    return {r["sender_id"]: r["id"] for r in rows}


async def _insert_events(
    conn: Conn,
    page_id: str,
    targets: Sequence[tuple[int, ConversationRecord]],
    *,
    stored: bool,
    per_conversation: bool = False,
) -> tuple[int, list[Any]]:
    """Insert the events of (conversation id, record) pairs at once.

    For `stored` conversations the unique indexes drop the events already stored. Returns
    how many were inserted and, if `per_conversation`, the (conversation_id, event_type)
    of each: RETURNING rows cost SQLite about half the insert.
    """
    event_rows = [
        (
            cid,
            page_id,
            e.event_type,
            e.message_id,
            e.event_timestamp,
            e.content,
            encode_payload(e.payload),
        )
        for cid, rec in targets
        for e in rec.events
    ]
    if not event_rows:
        return 0, []
    source, args = conn.rows(("bigint", "text", "text", "text", "bigint", "text", "jsonb"), event_rows, 1)
    sql = (
        "INSERT INTO contact_interaction_events (conversation_id, page_id, event_type, "
        f"message_id, event_timestamp, content, payload) {source}"
    )
    if stored:
        sql += " ON CONFLICT DO NOTHING"
    if not per_conversation:
        return await conn.execute(sql, *args), []
    rows = await conn.fetch(f"{sql} RETURNING conversation_id, event_type", *args)
    return len(rows), rows


async def _update_conversations(
    conn: Conn,
    page_id: str,
    merged: dict[str, ConversationRecord],
    existing: dict[str, Any],
    inserted_events: Sequence[Any],
    counts: WriteCounts,
) -> None:
    """Merge records into stored conversations: compare-and-set on version, re-read and
    retry on conflict; a conversation the merge does not change keeps its version."""
    new_messages: dict[int, int] = {}
    new_received: dict[int, int] = {}
    for r in inserted_events:
        if r["event_type"] in MESSAGE_EVENT_TYPES:
            new_messages[r["conversation_id"]] = new_messages.get(r["conversation_id"], 0) + 1
        if r["event_type"] == "message_received":
            new_received[r["conversation_id"]] = new_received.get(r["conversation_id"], 0) + 1
    pending = existing
    for attempt in range(CAS_ATTEMPTS):
        updates = []
        for sid, row in pending.items():
            cid = row["id"]
            values = _merged_values(row, merged[sid], new_messages.get(cid, 0), new_received.get(cid, 0))
            if values == _stored_values(row):
                counts.unchanged += 1
            else:
                updates.append((cid, row["version"], *values))
        if not updates:
            return
        source, args = conn.rows(
            ("bigint", "int", "text", "text", "text", "bigint", "int", "int"), updates, 1
        )
        done = await conn.fetch(
            "WITH v (cid, expected_version, facebook_conversation_id, sender_name, last_message, "
            f"last_message_time, message_count, unread_count) AS ({source}) "
            "UPDATE messenger_conversations AS c SET "
            "facebook_conversation_id = v.facebook_conversation_id, sender_name = v.sender_name, "
            "last_message = v.last_message, last_message_time = v.last_message_time, "
            "message_count = v.message_count, unread_count = v.unread_count, "
            "version = c.version + 1, updated_at = now_ms() "
            "FROM v WHERE c.id = v.cid AND c.version = v.expected_version RETURNING id",
            *args,
        )
        done_ids = {r["id"] for r in done}
        counts.updated += len(done_ids)
        lost = {u[0] for u in updates} - done_ids
        if not lost:
            return
        conflicted = [sid for sid, row in pending.items() if row["id"] in lost]
        await conn.sleep(random.uniform(0, 0.005 * (attempt + 1)))
        pending = await select_conversations(conn, page_id, conflicted)
    raise RuntimeError("conversation update kept conflicting; giving up")
