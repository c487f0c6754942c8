-- Autopilot (SPEC semantics 12 and 13), on PostgreSQL: the scheduler's memory of each page's last
-- outcome, the shared rate-limit pool, an index for inbox retention, and instr() so that shared SQL
-- can look for bytes inside an inbox body on both engines (SQLite has instr built in).
-- Times are milliseconds since the epoch, by the database's clock (now_ms()).

-- What the scheduler last saw of a page. When a page is next due is derived from sync_state
-- (a complete sync: completed_at + SYNC_INTERVAL_SECONDS; an unfinished one: at once) and from
-- not_before, which only ever postpones it (a backoff, a rate limit's regain time).
CREATE TABLE sync_schedule (
    page_id TEXT PRIMARY KEY REFERENCES facebook_pages (id) ON DELETE CASCADE,
    outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'token_invalid', 'rate_limited', 'error')),
    not_before BIGINT,
    failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at BIGINT NOT NULL DEFAULT now_ms()
);

-- One row for the app ('app') and one per Facebook Page ('page:<facebook page id>'), shared by
-- every user's row of that Page and by every replica. next_slot is a fractional millisecond so
-- that call spacing (1000 / rate) does not round the rate down.
CREATE TABLE rate_limit_pool (
    pool_key TEXT PRIMARY KEY,
    next_slot DOUBLE PRECISION NOT NULL DEFAULT 0,
    hold_until BIGINT,
    hold_code INTEGER,
    usage_pct DOUBLE PRECISION,
    usage_at BIGINT,
    rate_cap DOUBLE PRECISION,
    recent_sends TEXT NOT NULL DEFAULT '',
    page_limit INTEGER,
    page_limit_at BIGINT,
    calls BIGINT NOT NULL DEFAULT 0,
    throttled BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL DEFAULT now_ms()
);

-- Retention deletes old applied/ignored rows oldest first, in small batches.
CREATE INDEX idx_webhook_events_retention ON webhook_events (received_at)
    WHERE status IN ('applied', 'ignored');

CREATE OR REPLACE FUNCTION instr(haystack BYTEA, needle BYTEA) RETURNS INTEGER
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT position(needle IN haystack) $$;
