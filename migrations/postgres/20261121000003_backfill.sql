-- Backfill bookkeeping: which run copied an event, a run's liveness, and the legacy rows a
-- run reported instead of copying.
ALTER TABLE events ADD COLUMN IF NOT EXISTS backfill_run_id TEXT;
ALTER TABLE migration_runs ADD COLUMN IF NOT EXISTS heartbeat_at TIMESTAMPTZ;

CREATE TABLE IF NOT EXISTS migration_run_issues (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    stat_date   DATE NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS migration_run_issues_by_run ON migration_run_issues (run_id, id);
