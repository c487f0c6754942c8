"""The storage interface: what the service asks of its database, on either engine.

Everything here is drawn around what the service does (acquire a sync lock, save a page of
conversations, record a batch of webhook bodies, ...), not around SQL. Times are milliseconds
since the epoch, taken from the database's clock wherever they decide anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from core.records import ConversationRecord
from storage.rows import ActiveSyncRow, ConversationRow, EventRow, SyncStatisticsRow

if TYPE_CHECKING:  # they import this module's dataclasses (or the engine, which does)
    from storage.activity import InboxError, MinuteCount
    from storage.inbox import Transaction
    from storage.keys import ApiKeyRow
    from storage.notify import Subscription

T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    """A Facebook Page as one user registered it. The token never shows in repr."""

    id: str
    user_id: str
    facebook_page_id: str
    name: str | None
    token_status: str
    created_at: int
    updated_at: int
    access_token: str = field(repr=False)


@dataclass(frozen=True)
class Lease:
    """A held sync lock: writes that carry its fencing token are refused once it is taken over."""

    page_id: str
    locked_by: str
    fencing_token: int
    expires_at: int


@dataclass(frozen=True)
class SyncState:
    """The progress of a page's sync session (one row per page)."""

    page_id: str
    user_id: str
    sync_session_id: str
    mode: str
    last_cursor: str | None
    total_synced: int
    is_complete: bool
    watermark: int | None  # newest updated_time of the last complete sync
    session_watermark: int | None  # newest updated_time seen by the current session
    completed_syncs: int
    started_at: int
    updated_at: int
    last_error: str | None


@dataclass(frozen=True)
class SyncProgress:
    """What a sync writes to sync_state together with a page of conversations."""

    last_cursor: str | None
    synced: int  # conversations processed in this page, added to total_synced
    session_watermark: int | None
    is_complete: bool = False
    last_error: str | None = None


@dataclass
class WriteCounts:
    """What a write of conversation records did."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    events_inserted: int = 0

    def add(self, other: WriteCounts) -> None:
        """Accumulate another write's counts into this one."""
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.events_inserted += other.events_inserted


@dataclass(frozen=True)
class InboxBody:
    """A webhook body to record in the inbox, with its status (pending or invalid)."""

    body: bytes
    body_sha256: str
    status: str = "pending"
    error: str | None = None


class Storage(Protocol):
    """The one storage interface; `storage.open_storage(url)` picks the engine."""

    # composing primitives (business rules outside storage, e.g. webhook/apply.py)
    async def run_interaction(self, desc: str, fn: Callable[[Transaction], Awaitable[T]]) -> T:
        """Run fn(txn) in one write transaction (again on a transient failure); fn awaits only txn."""

    # wake-ups (storage/notify.py): a Subscription's `wait(seconds)` returns early after a commit
    def subscribe_events(self, page_id: str) -> Subscription:
        """Woken when events of the page row are committed (by any replica, with a listener)."""

    def subscribe_inbox(self) -> Subscription:
        """Woken when pending rows are committed to the webhook inbox (by any replica, with a listener)."""

    # life cycle
    async def migrate(self) -> list[str]:
        """Apply pending migrations in order, once each; returns the names applied now."""

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""

    async def close(self) -> None:
        """Close every connection."""

    # api keys
    async def user_for_key_hash(self, key_hash: str) -> str | None:
        """The user a hashed key belongs to, or None."""

    # pages
    async def register_page(
        self, user_id: str, facebook_page_id: str, access_token: str, name: str | None
    ) -> tuple[Page, bool]:
        """Create or update (token, name; token_status back to valid) a user's page; True if created."""

    async def get_page(self, user_id: str, page_id: str) -> Page | None:
        """One of the user's pages, or None (also for another user's page)."""

    async def find_page(self, page_id: str) -> Page | None:
        """A page by its id, whoever registered it (operator commands only)."""

    async def mark_token_invalid(self, page_id: str) -> None:
        """Record that Graph refused the page's token (code 190)."""

    # sync locks
    async def acquire_sync_lock(self, page_id: str, locked_by: str, ttl_seconds: float) -> Lease | None:
        """Take the page's lock if free or expired, in one statement; None while another lease is live."""

    async def extend_sync_lock(self, lease: Lease, ttl_seconds: float) -> Lease | None:
        """Push the lease's expiry; None if the lease was taken over or released."""

    async def release_sync_lock(self, lease: Lease) -> bool:
        """Release the lock if this lease still holds it."""

    async def current_lock(self, page_id: str) -> Lease | None:
        """The live lease on a page, if any."""

    async def cleanup_expired_locks(self) -> int:
        """Remove expired leases (their fencing tokens stay); returns how many."""

    # sync state
    async def get_sync_state(self, page_id: str) -> SyncState | None:
        """The page's sync state, if it ever synced."""

    async def start_sync_session(self, lease: Lease, user_id: str, session_id: str, mode: str) -> SyncState:
        """Begin a new session for the page (fenced): cursor cleared, watermark kept."""

    async def save_sync_progress(self, lease: Lease, progress: SyncProgress) -> SyncState:
        """Write sync_state alone (fenced); raises LeaseLost if the lease was taken over."""

    async def save_conversation_page(
        self, lease: Lease, records: Sequence[ConversationRecord], progress: SyncProgress
    ) -> WriteCounts:
        """One transaction: the conversations, their events and the next cursor (fenced)."""

    # conversations
    async def get_conversation(self, user_id: str, conversation_id: int) -> ConversationRow | None:
        """A conversation of one of the user's pages, or None."""

    async def list_conversations(
        self, page_id: str, limit: int, after: tuple[int, int] | None
    ) -> list[ConversationRow]:
        """Newest first by (last_message_time, id), strictly after the keyset position."""

    async def list_events(
        self, conversation_id: int, limit: int, after: tuple[int, int] | None
    ) -> list[EventRow]:
        """Newest first by (event_timestamp, id), strictly after the keyset position."""

    # monitoring
    async def active_syncs(self, user_id: str) -> list[ActiveSyncRow]:
        """The user's pages whose sync lock is live (the seed's active_syncs)."""

    async def sync_statistics(self, user_id: str) -> list[SyncStatisticsRow]:
        """Per page counts and sync progress (the seed's sync_statistics)."""

    # event stream
    async def last_event_id(self, page_id: str) -> int:
        """The highest event id of a page (0 when it has none)."""

    async def events_after(
        self, page_id: str, after_id: int, limit: int, until_id: int | None = None
    ) -> list[EventRow]:
        """A page's events with after_id < id (<= until_id), in id order."""

    # webhook inbox
    async def record_webhook_batch(self, bodies: Sequence[InboxBody]) -> None:
        """Commit raw bodies to the inbox in one transaction; a body already there is a no-op."""

    async def mark_webhook_failed(self, ids: Sequence[int], error: str) -> None:
        """Mark inbox rows failed with the error (outside the failed transaction)."""

    async def pending_webhook_ids(self, limit: int) -> list[int]:
        """Ids of pending inbox rows, oldest first."""

    async def requeue_webhooks(self, statuses: Sequence[str], *, with_skipped_items: bool = False) -> int:
        """Set rows of these statuses (and applied rows that skipped items) back to pending; how many."""

    async def webhook_status_counts(self) -> dict[str, int]:
        """Inbox rows by status."""

    async def pending_webhook_count(self) -> int:
        """How many inbox rows are pending (the applier's backlog)."""

    # ---- autopilot (issue 9; storage/autopilot.py): schedule, rate-limit pool, status, deleting ----
    async def due_pages(
        self, interval_ms: int, limit: int, grace_ms: int, exclude: Sequence[str] = ()
    ) -> list[DuePage]:
        """Pages due for a scheduled sync (valid token, unlocked, not held), oldest due first."""

    async def set_schedule(
        self,
        page_id: str,
        outcome: str,
        *,
        not_before: int | None = None,
        delay_ms: int | None = None,
        last_error: str | None = None,
        reset_failures: bool = True,
    ) -> None:
        """Record a scheduled sync's outcome (and how long to wait); a deleted page is a no-op."""

    async def record_sync_failure(
        self, page_id: str, error: str, base_ms: int, cap_ms: int
    ) -> ScheduleEntry | None:
        """Count a failure and back off min(base * 2**(failures-1), cap) from now; None if page gone."""

    async def page_sync_facts(
        self,
        user_id: str | None,
        page_id: str | None,
        interval_ms: int,
        grace_ms: int,
        *,
        count_conversations: bool = True,
    ) -> list[PageSyncFacts]:
        """What each page's status is built from (one user's pages, or all with user_id None)."""

    async def update_rate_pool(
        self, keys: Sequence[str], decide: Callable[[int, dict[str, PoolRow]], Any]
    ) -> Any:
        """One transaction: lock the pool rows (created if new), call decide(db_now, rows), save them."""

    async def rate_pool_rows(self, keys: Sequence[str]) -> tuple[int, dict[str, PoolRow]]:
        """(database now, the pool rows that exist among keys), without locking."""

    async def delete_expired_webhook_events(self, max_age_ms: int, limit: int) -> int:
        """Delete up to limit applied/ignored inbox rows older than max_age_ms; how many."""

    async def delete_page(self, user_id: str, page_id: str) -> bool:
        """Delete one of the user's pages with its data and lock (a running sync stops); False if none."""

    async def delete_conversation(
        self, user_id: str, conversation_id: int, contacts_of: BodyContacts, batch: int = 500
    ) -> bool:
        """Delete a conversation of the user's, its events and the inbox rows carrying only its contact."""

    # ---- stored API keys (issue 10; storage/keys.py) ----
    async def create_api_key(self, user_id: str, key_hash: str) -> ApiKeyRow:
        """Store a hashed key for a user; its row (the id is what `api-keys revoke` takes)."""

    async def list_api_keys(self) -> list[ApiKeyRow]:
        """Every stored key, oldest first (never a hash)."""

    async def revoke_api_key(self, key_id: int) -> ApiKeyRow | None:
        """Delete a stored key; the row it was, or None if there is none."""

    async def touch_api_key(self, key_hash: str, every_ms: int = 60_000) -> bool:
        """Record the key's use now, unless one was recorded less than every_ms ago."""

    # ---- the dashboard's reads (storage/activity.py) ----
    async def api_key_id(self, key_hash: str) -> int | None:
        """The id of a stored key, or None (a key from API_KEYS has none)."""

    async def events_per_minute(self, page_id: str, minutes: int) -> list[MinuteCount]:
        """Events stored for the page in each of the last `minutes` minutes, oldest first."""

    async def recent_webhook_errors(self, limit: int = 20) -> list[InboxError]:
        """The newest failed and invalid inbox rows (never their bodies)."""

    async def oldest_pending_webhook_at(self) -> int | None:
        """When the oldest pending inbox row arrived, or None."""


# Reads an inbox body: (facebook page id, contact PSID) of each item naming a contact; raises if unreadable.
BodyContacts = Callable[[bytes], Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class DuePage:
    """A page the scheduler may sync now, and when it became due (database clock)."""

    page_id: str
    user_id: str
    facebook_page_id: str
    due_at: int
    db_now: int


@dataclass(frozen=True)
class ScheduleEntry:
    """The scheduler's memory of a page: its last outcome and how long it must wait."""

    page_id: str
    outcome: str  # ok | token_invalid | rate_limited | error
    not_before: int | None
    failures: int
    last_error: str | None
    updated_at: int


@dataclass(frozen=True)
class PageSyncFacts:
    """Everything a page's status is built from, read together (times in ms, database clock)."""

    page: Page
    db_now: int
    conversations: int
    session_id: str | None
    is_complete: bool | None  # None: never synced
    total_synced: int  # by the current session
    completed_syncs: int
    completed_at: int | None
    state_updated_at: int | None
    state_error: str | None
    schedule: ScheduleEntry | None
    lock_expires_at: int | None  # a live lease: a sync is running
    hold_until: int | None  # the rate-limit pool holds the page (or the whole app) until then
    due_at: int | None  # when the scheduler will next run it (None: its token is invalid)


@dataclass
class PoolRow:
    """One row of the rate-limit pool ('app', or 'page:<facebook page id>'), changed in place by a decide."""

    key: str
    next_slot: float = 0.0  # ms: the earliest next call (per-page spacing; app-wide pacing)
    hold_until: int | None = None
    hold_code: int | None = None
    usage_pct: float | None = None
    usage_at: int | None = None
    rate_cap: float | None = None  # app row: calls a second allowed across replicas
    recent_sends: str = ""  # app row: send times (ms) of the last second, comma-separated
    page_limit: int | None = None  # page row: a reduced page size Graph asked for
    page_limit_at: int | None = None
    calls: int = 0
    throttled: int = 0
