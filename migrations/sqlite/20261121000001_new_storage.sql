-- New (event-sourced) storage: raw events, campaign ownership, idempotency keys and daily
-- rollups. Rollups are maintained in the same transaction as the events they count.

CREATE TABLE IF NOT EXISTS campaigns (
    campaign_id TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS campaigns_by_user ON campaigns (user_id);

CREATE TABLE IF NOT EXISTS events (
    id               INTEGER PRIMARY KEY,
    user_id          TEXT NOT NULL,
    campaign_id      TEXT NOT NULL,
    event_type       INTEGER NOT NULL,
    count            INTEGER NOT NULL CHECK (count > 0),
    occurred_at      TEXT NOT NULL,
    email_account_id TEXT,
    idempotency_key  TEXT,
    recorded_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS events_by_user_time ON events (user_id, occurred_at);

-- One row per key ever accepted: a retry with a known key is a duplicate.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    user_id         TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    recorded_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (user_id, idempotency_key)
) WITHOUT ROWID;

-- Only non-zero rows: a row exists once an event of its kind happened that day.
CREATE TABLE IF NOT EXISTS daily_rollups (
    user_id     TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    day         TEXT NOT NULL,
    event_type  INTEGER NOT NULL,
    total       INTEGER NOT NULL CHECK (total > 0),
    PRIMARY KEY (user_id, campaign_id, day, event_type)
) WITHOUT ROWID;
-- A user's series over a range (the primary key serves one campaign's totals).
CREATE INDEX IF NOT EXISTS daily_rollups_by_user_day ON daily_rollups (user_id, day);
-- The operator's all-users view over a range.
CREATE INDEX IF NOT EXISTS daily_rollups_by_day ON daily_rollups (day);
