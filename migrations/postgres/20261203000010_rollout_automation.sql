-- The guard's run-time settings and state and the progressive schedule, as one JSON document
-- versioned with the rollout (NULL: nothing set).
ALTER TABLE rollout_state ADD COLUMN IF NOT EXISTS automation TEXT;

-- Leases: which replica does a job that exactly one replica may do at a time (the
-- progressive schedule's driver). A lease past `expires_at` may be taken by another holder.
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
