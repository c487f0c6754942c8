-- The service's tables, on SQLite. Times are milliseconds since the epoch (BIGINT), as on
-- PostgreSQL, so both engines compare and return the same values. The engine writes the
-- database's clock, now_ms() in shared SQL, as the julianday('now') expression used below.

CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

CREATE TABLE facebook_pages (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    facebook_page_id TEXT NOT NULL,
    name TEXT,
    access_token TEXT NOT NULL,
    token_status TEXT NOT NULL DEFAULT 'valid' CHECK (token_status IN ('valid', 'invalid')),
    created_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    updated_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    UNIQUE (user_id, facebook_page_id)
);
CREATE INDEX idx_facebook_pages_fb_id ON facebook_pages (facebook_page_id);

CREATE TABLE messenger_conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    page_id TEXT NOT NULL REFERENCES facebook_pages (id) ON DELETE CASCADE,
    facebook_conversation_id TEXT,
    sender_id TEXT NOT NULL,
    sender_name TEXT,
    last_message TEXT,
    last_message_time BIGINT NOT NULL DEFAULT 0,
    message_count INTEGER NOT NULL DEFAULT 0,
    unread_count INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    updated_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    UNIQUE (page_id, sender_id)
);
CREATE INDEX idx_conversations_page_recent
    ON messenger_conversations (page_id, last_message_time DESC, id DESC);

CREATE TABLE contact_interaction_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id BIGINT NOT NULL REFERENCES messenger_conversations (id) ON DELETE CASCADE,
    page_id TEXT NOT NULL REFERENCES facebook_pages (id) ON DELETE CASCADE,
    event_type TEXT NOT NULL,
    message_id TEXT,
    event_timestamp BIGINT NOT NULL,
    content TEXT,
    payload TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);
CREATE UNIQUE INDEX idx_unique_event_by_message
    ON contact_interaction_events (conversation_id, event_type, message_id)
    WHERE message_id IS NOT NULL;
CREATE UNIQUE INDEX idx_unique_event_by_timestamp
    ON contact_interaction_events (conversation_id, event_type, event_timestamp)
    WHERE message_id IS NULL;
CREATE INDEX idx_events_conversation_recent
    ON contact_interaction_events (conversation_id, event_timestamp DESC, id DESC);
CREATE INDEX idx_events_page_id ON contact_interaction_events (page_id, id);

CREATE TABLE sync_state (
    page_id TEXT PRIMARY KEY REFERENCES facebook_pages (id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    sync_session_id TEXT NOT NULL,
    mode TEXT NOT NULL DEFAULT 'full',
    last_cursor TEXT,
    total_synced INTEGER NOT NULL DEFAULT 0,
    is_complete INTEGER NOT NULL DEFAULT 0,
    watermark BIGINT,
    session_watermark BIGINT,
    completed_syncs INTEGER NOT NULL DEFAULT 0,
    started_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    updated_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    completed_at BIGINT,
    last_error TEXT
);

-- One row per page that ever synced: release and cleanup clear the holder but keep the row,
-- so fencing_token only ever grows for a page.
CREATE TABLE sync_locks (
    page_id TEXT PRIMARY KEY,
    locked_by TEXT,
    locked_at BIGINT,
    expires_at BIGINT,
    fencing_token BIGINT NOT NULL
);

CREATE TABLE webhook_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at BIGINT NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    body BLOB NOT NULL,
    body_sha256 TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'applied', 'failed', 'invalid', 'ignored')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    applied_at BIGINT
);
CREATE INDEX idx_webhook_events_pending ON webhook_events (id) WHERE status = 'pending';

CREATE VIEW active_syncs AS
    SELECT l.page_id, p.user_id, p.facebook_page_id, l.locked_by, l.locked_at, l.expires_at,
           l.fencing_token, s.sync_session_id, s.total_synced, s.last_cursor IS NOT NULL AS has_cursor
    FROM sync_locks l
    JOIN facebook_pages p ON p.id = l.page_id
    LEFT JOIN sync_state s ON s.page_id = l.page_id
    WHERE l.locked_by IS NOT NULL AND l.expires_at > CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER);

CREATE VIEW sync_statistics AS
    SELECT p.id AS page_id, p.user_id, p.facebook_page_id, p.token_status,
           (SELECT count(*) FROM messenger_conversations c WHERE c.page_id = p.id) AS conversations,
           (SELECT count(*) FROM contact_interaction_events e WHERE e.page_id = p.id) AS events,
           s.sync_session_id, s.is_complete, s.total_synced, s.completed_syncs,
           s.watermark, s.started_at, s.updated_at, s.completed_at, s.last_error
    FROM facebook_pages p
    LEFT JOIN sync_state s ON s.page_id = p.id;
