-- Backfill bookkeeping: which run copied an event, a run's liveness, and the legacy rows a
-- run reported instead of copying.
ALTER TABLE events ADD COLUMN backfill_run_id TEXT;
ALTER TABLE migration_runs ADD COLUMN heartbeat_at TEXT;

CREATE TABLE IF NOT EXISTS migration_run_issues (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    stat_date   TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS migration_run_issues_by_run ON migration_run_issues (run_id, id);
