-- The read rollout: one versioned row, per-user overrides in their own table, and an audit
-- entry per change (written in the same transaction as the change).
CREATE TABLE IF NOT EXISTS rollout_state (
    id           SMALLINT PRIMARY KEY CHECK (id = 1),
    basis_points INTEGER NOT NULL DEFAULT 0 CHECK (basis_points BETWEEN 0 AND 10000),
    kill_switch  BOOLEAN NOT NULL DEFAULT false,
    salt         TEXT NOT NULL DEFAULT 'campaign-stats',
    version      BIGINT NOT NULL DEFAULT 0,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO rollout_state (id) VALUES (1) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS rollout_overrides (
    user_id    TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS rollout_audit (
    version BIGINT PRIMARY KEY,
    actor   TEXT NOT NULL,
    at      TIMESTAMPTZ NOT NULL,
    change  TEXT NOT NULL,
    before  TEXT NOT NULL,
    after   TEXT NOT NULL,
    reason  TEXT NOT NULL
);
