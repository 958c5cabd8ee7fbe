-- How many times a run was resumed from its checkpoint (after a cancel, a shutdown or a
-- crash), so that its status says so.
ALTER TABLE migration_runs ADD COLUMN IF NOT EXISTS resumes INTEGER NOT NULL DEFAULT 0;
