-- The read rollout: one versioned row, per-user overrides in their own table, and an audit
-- entry per change (written in the same transaction as the change).
CREATE TABLE IF NOT EXISTS rollout_state (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    basis_points INTEGER NOT NULL DEFAULT 0 CHECK (basis_points BETWEEN 0 AND 10000),
    kill_switch  INTEGER NOT NULL DEFAULT 0,
    salt         TEXT NOT NULL DEFAULT 'campaign-stats',
    version      INTEGER NOT NULL DEFAULT 0,
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
INSERT INTO rollout_state (id) VALUES (1) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS rollout_overrides (
    user_id    TEXT PRIMARY KEY NOT NULL,
    source     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS rollout_audit (
    version INTEGER PRIMARY KEY,
    actor   TEXT NOT NULL,
    at      TEXT NOT NULL,
    change  TEXT NOT NULL,
    before  TEXT NOT NULL,
    after   TEXT NOT NULL,
    reason  TEXT NOT NULL
);
