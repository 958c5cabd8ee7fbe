-- New (event-sourced) storage: raw events, campaign ownership, idempotency keys and daily
-- rollups. Rollups are maintained in the same transaction as the events they count.
-- Every hot query names its user, so these tables can later be distributed by user_id.

CREATE TABLE IF NOT EXISTS campaigns (
    campaign_id TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS campaigns_by_user ON campaigns (user_id);

-- Raw events, partitioned by month of occurred_at. The service creates each month's
-- partition before it first writes to it (events_pYYYY_MM); the default partition only
-- catches rows if that ever fails, so that a write never fails for want of a partition.
CREATE TABLE IF NOT EXISTS events (
    id               BIGINT GENERATED ALWAYS AS IDENTITY,
    user_id          TEXT NOT NULL,
    campaign_id      TEXT NOT NULL,
    event_type       SMALLINT NOT NULL,
    count            INTEGER NOT NULL CHECK (count > 0),
    occurred_at      TIMESTAMPTZ NOT NULL,
    email_account_id TEXT,
    idempotency_key  TEXT,
    recorded_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE TABLE IF NOT EXISTS events_default PARTITION OF events DEFAULT;
CREATE INDEX IF NOT EXISTS events_by_user_time ON events (user_id, occurred_at);

-- One row per key ever accepted: a retry with a known key is a duplicate. Kept apart from
-- the partitioned events table, whose unique keys would have to include occurred_at.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    user_id         TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);

-- Only non-zero rows: a row exists once an event of its kind happened that day.
CREATE TABLE IF NOT EXISTS daily_rollups (
    user_id     TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    day         DATE NOT NULL,
    event_type  SMALLINT NOT NULL,
    total       BIGINT NOT NULL CHECK (total > 0),
    PRIMARY KEY (user_id, campaign_id, day, event_type)
);
-- A user's series over a range (the primary key serves one campaign's totals).
CREATE INDEX IF NOT EXISTS daily_rollups_by_user_day ON daily_rollups (user_id, day);
-- The operator's all-users view over a range.
CREATE INDEX IF NOT EXISTS daily_rollups_by_day ON daily_rollups (day);
