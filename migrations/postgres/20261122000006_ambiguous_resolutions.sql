-- Ambiguous legacy rows get a resolution (see src/migration/ambiguous.rs and docs/storage.md).

-- Why a backfill reported a row (NULL for verify's differences and for rows reported before
-- this migration).
ALTER TABLE migration_run_issues ADD COLUMN IF NOT EXISTS kind TEXT;

-- Each ResolveAmbiguousRows call: who, why, what it covered and how many rows.
CREATE TABLE IF NOT EXISTS ambiguous_resolutions (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    resolution TEXT NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    selection  TEXT NOT NULL,
    row_count  BIGINT NOT NULL,
    copied     BIGINT NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The resolution of each legacy key: later backfills and verifies honour it.
CREATE TABLE IF NOT EXISTS resolved_legacy_rows (
    campaign_id   TEXT NOT NULL,
    stat_date     DATE NOT NULL,
    resolution    TEXT NOT NULL,
    resolution_id BIGINT NOT NULL,
    PRIMARY KEY (campaign_id, stat_date)
);

-- A transition into VERIFIED past unresolved ambiguous rows is forced, and says so.
ALTER TABLE migration_transitions ADD COLUMN IF NOT EXISTS forced BOOLEAN NOT NULL DEFAULT false;

-- Provenance of backfilled history: one row per batch, the legacy key range it read (after
-- the `after_` key, up to and including the `last_` key) and what it copied from it (rollups
-- do not say where their counts came from).
CREATE TABLE IF NOT EXISTS backfill_batches (
    run_id         TEXT NOT NULL,
    after_campaign TEXT NOT NULL,
    after_date     DATE NOT NULL,
    last_campaign  TEXT NOT NULL,
    last_date      DATE NOT NULL,
    processed      BIGINT NOT NULL,
    copied         BIGINT NOT NULL,
    at             TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (run_id, after_campaign, after_date)
);
