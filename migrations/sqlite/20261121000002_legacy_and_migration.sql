-- The legacy wide table, created only where the legacy system has not made it already.
-- One row per campaign per day, a column per metric. Counts are nullable, as in the legacy
-- system: a NULL count is reported by the backfill as ambiguous.
CREATE TABLE IF NOT EXISTS campaign_daily_stat_entries (
    id               INTEGER PRIMARY KEY,
    campaign_id      TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    stat_date        TEXT NOT NULL,
    sent             INTEGER DEFAULT 0,
    opened           INTEGER DEFAULT 0,
    replied          INTEGER DEFAULT 0,
    positive_replies INTEGER DEFAULT 0,
    bounced          INTEGER DEFAULT 0,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (campaign_id, stat_date)
);
-- No index is made here: on a legacy table the legacy system already has, building one would
-- block its writes for as long as it runs. The service indexes (user_id, stat_date) only on a
-- legacy table it has just created itself (storage code, after the migrations).

CREATE TABLE IF NOT EXISTS migration_state (
    id                    INTEGER PRIMARY KEY CHECK (id = 1),
    phase                 TEXT NOT NULL,
    changed_at            TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    dual_write_started_at TEXT
);
INSERT INTO migration_state (id, phase) VALUES (1, 'LEGACY_ONLY') ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS migration_transitions (
    id         INTEGER PRIMARY KEY,
    from_phase TEXT NOT NULL,
    to_phase   TEXT NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE IF NOT EXISTS migration_runs (
    run_id       TEXT PRIMARY KEY NOT NULL,
    kind         TEXT NOT NULL,
    actor        TEXT NOT NULL,
    dry_run      INTEGER NOT NULL DEFAULT 0,
    state        TEXT NOT NULL,
    started_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at  TEXT,
    batch_size   INTEGER NOT NULL DEFAULT 0,
    range_start  TEXT,
    range_end    TEXT,
    processed    INTEGER NOT NULL DEFAULT 0,
    copied       INTEGER NOT NULL DEFAULT 0,
    skipped      INTEGER NOT NULL DEFAULT 0,
    ambiguous    INTEGER NOT NULL DEFAULT 0,
    failed       INTEGER NOT NULL DEFAULT 0,
    compared     INTEGER NOT NULL DEFAULT 0,
    mismatches   INTEGER NOT NULL DEFAULT 0,
    checkpoint_campaign TEXT,
    checkpoint_date     TEXT,
    last_error   TEXT
) WITHOUT ROWID;
