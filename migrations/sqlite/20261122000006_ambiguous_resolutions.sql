-- Ambiguous legacy rows get a resolution (see src/migration/ambiguous.rs and docs/storage.md).

-- Why a backfill reported a row (NULL for verify's differences and for rows reported before
-- this migration).
ALTER TABLE migration_run_issues ADD COLUMN kind TEXT;

-- Each ResolveAmbiguousRows call: who, why, what it covered and how many rows.
CREATE TABLE IF NOT EXISTS ambiguous_resolutions (
    id         INTEGER PRIMARY KEY,
    resolution TEXT NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    selection  TEXT NOT NULL,
    row_count  INTEGER NOT NULL,
    copied     INTEGER NOT NULL,
    at         TEXT NOT NULL
);

-- The resolution of each legacy key: later backfills and verifies honour it.
CREATE TABLE IF NOT EXISTS resolved_legacy_rows (
    campaign_id   TEXT NOT NULL,
    stat_date     TEXT NOT NULL,
    resolution    TEXT NOT NULL,
    resolution_id INTEGER NOT NULL,
    PRIMARY KEY (campaign_id, stat_date)
) WITHOUT ROWID;

-- A transition into VERIFIED past unresolved ambiguous rows is forced, and says so.
ALTER TABLE migration_transitions ADD COLUMN forced INTEGER NOT NULL DEFAULT 0;

-- Provenance of backfilled history: one row per batch, the legacy key range it read (after
-- the `after_` key, up to and including the `last_` key) and what it copied from it (rollups
-- do not say where their counts came from).
CREATE TABLE IF NOT EXISTS backfill_batches (
    run_id         TEXT NOT NULL,
    after_campaign TEXT NOT NULL,
    after_date     TEXT NOT NULL,
    last_campaign  TEXT NOT NULL,
    last_date      TEXT NOT NULL,
    processed      INTEGER NOT NULL,
    copied         INTEGER NOT NULL,
    at             TEXT NOT NULL,
    PRIMARY KEY (run_id, after_campaign, after_date)
) WITHOUT ROWID;
