-- Autopilot (SPEC semantics 12 and 13), on SQLite: the scheduler's memory of each page's last
-- outcome, the shared rate-limit pool and an index for inbox retention (instr() is built in here;
-- the PostgreSQL half creates one of the same meaning). Times are milliseconds since the epoch.

-- What the scheduler last saw of a page. When a page is next due is derived from sync_state
-- (a complete sync: completed_at + SYNC_INTERVAL_SECONDS; an unfinished one: at once) and from
-- not_before, which only ever postpones it (a backoff, a rate limit's regain time).
CREATE TABLE sync_schedule (
    page_id TEXT PRIMARY KEY REFERENCES facebook_pages (id) ON DELETE CASCADE,
    outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'token_invalid', 'rate_limited', 'error')),
    not_before BIGINT,
    failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

-- One row for the app ('app') and one per Facebook Page ('page:<facebook page id>'), shared by
-- every user's row of that Page and by every replica. next_slot is a fractional millisecond so
-- that call spacing (1000 / rate) does not round the rate down.
CREATE TABLE rate_limit_pool (
    pool_key TEXT PRIMARY KEY,
    next_slot REAL NOT NULL DEFAULT 0,
    hold_until BIGINT,
    hold_code INTEGER,
    usage_pct REAL,
    usage_at BIGINT,
    rate_cap REAL,
    recent_sends TEXT NOT NULL DEFAULT '',
    page_limit INTEGER,
    page_limit_at BIGINT,
    calls BIGINT NOT NULL DEFAULT 0,
    throttled BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

-- Retention deletes old applied/ignored rows oldest first, in small batches.
CREATE INDEX idx_webhook_events_retention ON webhook_events (received_at)
    WHERE status IN ('applied', 'ignored');
