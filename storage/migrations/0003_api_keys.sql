-- API keys remember when they were last used (written at most once a minute per key).
-- Portable: the same statement on SQLite and PostgreSQL.
ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT;
