//! SQL that both backends run as written, so that the two can never drift apart.
//!
//! Parameters are `$1, $2, …`: PostgreSQL's own style, which SQLite (through sqlx) binds by
//! number too. Statements that differ between the backends (bulk inserts, locking, partitions,
//! `ANY` against `IN` lists) stay in the backend modules. Names the domain owns (run kinds
//! and states, resolutions) are spelled by the domain's enums, at compile time.

use const_format::concatcp;

use crate::migration::ambiguous::Resolution;
use crate::migration::{RunKind, RunState};

/// A name of the domain as an SQL string literal.
macro_rules! literal {
    ($name:expr) => {
        concatcp!("'", $name, "'")
    };
}

const BACKFILL: &str = literal!(RunKind::Backfill.name());
const VERIFY: &str = literal!(RunKind::Verify.name());
const RUNNING: &str = literal!(RunState::Running.name());
const COMPLETED: &str = literal!(RunState::Completed.name());
const SKIP: &str = literal!(Resolution::Skip.name());

/// The columns of `migration_runs` as `RunRow` reads them.
const RUN_COLUMNS: &str = "run_id, kind, actor, dry_run, state, started_at, finished_at, \
     CAST(batch_size AS BIGINT) AS batch_size, processed, copied, skipped, ambiguous, failed, \
     compared, mismatches, checkpoint_campaign, checkpoint_date, last_error, \
     CAST(resumes AS BIGINT) AS resumes";

/// The run id of the last completed real (not dry) backfill: the one whose ambiguous rows
/// count.
const LAST_BACKFILL: &str = concatcp!(
    "(SELECT run_id FROM migration_runs WHERE kind = ",
    BACKFILL,
    " AND NOT dry_run \
     AND state = ",
    COMPLETED,
    " ORDER BY finished_at DESC LIMIT 1)"
);

/// The rows of the last completed real backfill's report (alias `i`) that no resolution
/// covers yet.
const UNRESOLVED_ISSUES: &str = concatcp!(
    "migration_run_issues i WHERE i.run_id = ",
    LAST_BACKFILL,
    " AND NOT EXISTS (SELECT 1 FROM resolved_legacy_rows x \
         WHERE x.campaign_id = i.campaign_id AND x.stat_date = i.stat_date)"
);

/// The rollout row: basis points, kill switch, salt, version, last change, shadow sample rate,
/// automation (JSON).
const ROLLOUT_STATE_ROW: &str = "SELECT CAST(basis_points AS BIGINT), kill_switch, salt, \
     CAST(version AS BIGINT), updated_at, CAST(shadow_sample_ppm AS BIGINT), automation \
     FROM rollout_state WHERE id = 1";

// Schema.

/// The index serving legacy reads by user. Made only together with a legacy table the
/// service itself created (empty, so at once): on a legacy table that already exists, an
/// index build would block every write to it for as long as it runs, so it is left to the
/// operator (README, "Running on PostgreSQL").
pub const LEGACY_BY_USER_INDEX: &str = "CREATE INDEX IF NOT EXISTS \
    campaign_daily_stat_entries_by_user_date ON campaign_daily_stat_entries (user_id, stat_date)";

/// Records that a migration applied under an earlier text (`$3`, its checksum then) stands
/// for its current text (`$1`), so that the migrator accepts it.
pub const ADOPT_EDITED_MIGRATION: &str =
    "UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2 AND checksum = $3";

// Health.

pub const PING: &str = "SELECT 1";

// The migration phase and its history.

/// The phase's name (read inside a write transaction: writes follow it).
pub const PHASE_NAME: &str = "SELECT phase FROM migration_state WHERE id = 1";
pub const PHASE_STATE: &str = "SELECT phase, changed_at FROM migration_state WHERE id = 1";
pub const SET_PHASE: &str = "UPDATE migration_state SET phase = $1, changed_at = $2, \
    dual_write_started_at = $3 WHERE id = 1";
pub const INSERT_TRANSITION: &str = "INSERT INTO migration_transitions \
    (from_phase, to_phase, actor, reason, at, forced) VALUES ($1, $2, $3, $4, $5, $6)";
/// The phase row a transition starts from (SQLite: its single writer already serialises).
pub const PHASE_ROW: &str =
    "SELECT phase, changed_at, dual_write_started_at FROM migration_state WHERE id = 1";
/// [`PHASE_ROW`], locking it until the transaction ends (PostgreSQL).
pub const PHASE_ROW_FOR_UPDATE: &str = "SELECT phase, changed_at, dual_write_started_at \
    FROM migration_state WHERE id = 1 FOR UPDATE";
pub const TRANSITIONS: &str = "SELECT from_phase, to_phase, actor, reason, at, forced \
    FROM migration_transitions ORDER BY id DESC LIMIT $1";

/// What `PreconditionFacts` needs: the finish time of the last real backfill, the latest
/// verify's if it was clean, and the last backfill's unresolved ambiguous rows.
pub const PRECONDITION_FACTS: &str = concatcp!(
    "SELECT \
    (SELECT MAX(finished_at) FROM migration_runs \
     WHERE kind = ",
    BACKFILL,
    " AND NOT dry_run AND state = ",
    COMPLETED,
    "), \
    (SELECT MAX(finished_at) FROM migration_runs \
     WHERE kind = ",
    VERIFY,
    " AND state = ",
    COMPLETED,
    " AND mismatches = 0 \
     AND finished_at = (SELECT MAX(finished_at) FROM migration_runs \
                        WHERE kind = ",
    VERIFY,
    " AND state = ",
    COMPLETED,
    ")), \
    (SELECT COUNT(*) FROM ",
    UNRESOLVED_ISSUES,
    ")"
);

// Backfill and verify runs.

pub const CREATE_RUN: &str = concatcp!(
    "INSERT INTO migration_runs (run_id, kind, actor, dry_run, state, \
    started_at, batch_size, heartbeat_at) VALUES ($1, $2, $3, $4, ",
    RUNNING,
    ", $5, $6, $5)"
);
/// Ends a run in `$1` (completed, failed, cancelled) at `$2`, keeping an error `$3` if any.
pub const FINISH_RUN: &str = "UPDATE migration_runs SET state = $1, finished_at = $2, \
    heartbeat_at = $2, last_error = COALESCE($3, last_error) WHERE run_id = $4";
pub const RUN_BY_ID: &str = concatcp!(
    "SELECT ",
    RUN_COLUMNS,
    " FROM migration_runs WHERE run_id = $1"
);
/// The newest `$1` runs.
pub const RECENT_RUNS: &str = concatcp!(
    "SELECT ",
    RUN_COLUMNS,
    " FROM migration_runs ORDER BY started_at DESC LIMIT $1"
);
/// The latest backfill of the kind (`$1`: dry run) that did not complete: stopped, failed,
/// or still `running` with a heartbeat older than `$2` (its process died).
pub const UNFINISHED_BACKFILL: &str = concatcp!(
    "SELECT ",
    RUN_COLUMNS,
    " FROM migration_runs WHERE kind = ",
    BACKFILL,
    " AND dry_run = $1 AND state <> ",
    COMPLETED,
    " \
     AND (state <> ",
    RUNNING,
    " OR heartbeat_at < $2) ORDER BY started_at DESC LIMIT 1"
);
pub const RESUME_RUN: &str = concatcp!(
    "UPDATE migration_runs SET state = ",
    RUNNING,
    ", finished_at = NULL, \
    heartbeat_at = $1, resumes = resumes + 1 WHERE run_id = $2"
);
/// A backfill batch's counts and checkpoint, committed with the batch.
pub const BATCH_PROGRESS: &str = "UPDATE migration_runs SET processed = processed + $1, \
    copied = copied + $2, skipped = skipped + $3, ambiguous = ambiguous + $4, \
    checkpoint_campaign = COALESCE($5, checkpoint_campaign), \
    checkpoint_date = COALESCE($6, checkpoint_date), heartbeat_at = $7 WHERE run_id = $8";
/// A run's reported rows (alias `i`) with the resolution of their legacy key (alias `x`):
/// backfill runs only, as a verify's differences are not resolved.
const ISSUES_WITH_RESOLUTIONS: &str = concatcp!(
    "migration_run_issues i LEFT JOIN resolved_legacy_rows x \
     ON x.campaign_id = i.campaign_id AND x.stat_date = i.stat_date \
     AND EXISTS (SELECT 1 FROM migration_runs m WHERE m.run_id = i.run_id \
                 AND m.kind = ",
    BACKFILL,
    ") \
     WHERE i.run_id = $1"
);

/// A run's reported rows, oldest first, with their resolution.
pub const RUN_ISSUES: &str = concatcp!(
    "SELECT i.campaign_id, i.user_id, i.stat_date, i.reason, i.kind, x.resolution FROM ",
    ISSUES_WITH_RESOLUTIONS,
    " ORDER BY i.id LIMIT $2"
);
/// How many of a run's reported rows are resolved, and how many in all.
pub const RUN_ISSUE_COUNTS: &str = concatcp!(
    "SELECT COUNT(x.resolution), COUNT(*) FROM ",
    ISSUES_WITH_RESOLUTIONS
);
/// Records rows a run reported; the caller adds `VALUES` rows.
pub const INSERT_RUN_ISSUES: &str =
    "INSERT INTO migration_run_issues (run_id, campaign_id, user_id, stat_date, reason, kind) ";
/// Completes a verify run with its findings.
pub const COMPLETE_VERIFY: &str = concatcp!(
    "UPDATE migration_runs SET state = ",
    COMPLETED,
    ", \
    finished_at = $1, heartbeat_at = $2, processed = $3, compared = $4, mismatches = $5, \
    ambiguous = $6 WHERE run_id = $7"
);
/// Records the legacy key range one backfill batch read, and what it copied.
pub const INSERT_BACKFILL_BATCH: &str = "INSERT INTO backfill_batches (run_id, after_campaign, \
    after_date, last_campaign, last_date, processed, copied, at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

// Ambiguous rows and their resolutions.

/// The unresolved ambiguous rows of the last completed real backfill, as the backfill reads
/// legacy rows (`BACKFILL_SELECT`'s columns), with the kind they were reported for. The
/// backend's backfill select is put in front.
pub const UNRESOLVED_ROWS_JOIN: &str = concatcp!(
    ", ",
    UNRESOLVED_ISSUES,
    " AND i.campaign_id = l.campaign_id AND i.stat_date = l.stat_date \
     AND i.user_id = l.user_id ORDER BY l.campaign_id, l.stat_date"
);
/// The campaigns among the unresolved rows that appear under several users in legacy.
pub const UNRESOLVED_SEVERAL_USERS: &str = concatcp!(
    "SELECT campaign_id FROM campaign_daily_stat_entries WHERE campaign_id IN \
     (SELECT i.campaign_id FROM ",
    UNRESOLVED_ISSUES,
    ") GROUP BY campaign_id HAVING COUNT(DISTINCT user_id) > 1"
);
/// Unresolved rows left.
pub const UNRESOLVED_COUNT: &str = concatcp!("SELECT COUNT(*) FROM ", UNRESOLVED_ISSUES);
pub const INSERT_RESOLUTION: &str = "INSERT INTO ambiguous_resolutions \
    (resolution, actor, reason, selection, row_count, copied, at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";
/// Records the resolution of legacy keys; the caller adds `VALUES` rows.
pub const INSERT_RESOLVED_ROWS: &str =
    "INSERT INTO resolved_legacy_rows (campaign_id, stat_date, resolution, resolution_id) ";
/// Audited resolutions, newest first.
pub const RESOLUTIONS: &str = "SELECT id, resolution, actor, reason, selection, row_count, \
    copied, at FROM ambiguous_resolutions ORDER BY id DESC LIMIT $1";

/// A chunk of verify: legacy rows (the caller adds the condition "after the last key") in key order, each with its five
/// counts (NULL as 0) and the new storage's five for the same `(user, campaign, day)`, found
/// through the rollups' primary key. The caller adds an optional range and `LIMIT`.
pub const VERIFY_LEGACY_CHUNK: &str = "SELECT l.user_id, l.campaign_id, l.stat_date, \
    CAST(COALESCE(l.sent, 0) AS BIGINT), CAST(COALESCE(l.opened, 0) AS BIGINT), \
    CAST(COALESCE(l.replied, 0) AS BIGINT), CAST(COALESCE(l.positive_replies, 0) AS BIGINT), \
    CAST(COALESCE(l.bounced, 0) AS BIGINT), \
    COALESCE(r.sent, 0), COALESCE(r.opened, 0), COALESCE(r.replied, 0), \
    COALESCE(r.positive_replies, 0), COALESCE(r.bounced, 0) \
    FROM campaign_daily_stat_entries l LEFT JOIN campaign_day_totals r \
    ON r.user_id = l.user_id AND r.campaign_id = l.campaign_id AND r.day = l.stat_date \
    WHERE (l.campaign_id, l.stat_date) > ";
/// A chunk of the rollup rows legacy has no row for (the caller adds the key to start after),
/// in key order: the differences a key-by-key walk of legacy cannot see.
pub const VERIFY_NEW_ONLY_CHUNK: &str = "SELECT r.user_id, r.campaign_id, r.day, r.sent, \
    r.opened, r.replied, r.positive_replies, r.bounced FROM campaign_day_totals r \
    WHERE r.sent + r.opened + r.replied + r.positive_replies + r.bounced > 0 \
    AND NOT EXISTS (SELECT 1 FROM campaign_daily_stat_entries l \
        WHERE l.campaign_id = r.campaign_id AND l.stat_date = r.day AND l.user_id = r.user_id) \
    AND (r.user_id, r.campaign_id, r.day) > ";
/// The `(campaign, day)` keys verify sets apart, and whether each is resolved: the last
/// completed real backfill's unresolved rows (0), and the keys skipped on purpose (1). Keys
/// resolved by copying are compared like any other.
pub const VERIFY_AMBIGUOUS: &str = concatcp!(
    "SELECT i.campaign_id, i.stat_date, CAST(0 AS BIGINT) FROM ",
    UNRESOLVED_ISSUES,
    " UNION ALL SELECT campaign_id, stat_date, CAST(1 AS BIGINT) FROM resolved_legacy_rows \
     WHERE resolution = ",
    SKIP,
    ""
);

/// Legacy rows whose five counts are all zero.
pub const LEGACY_ZERO_ROWS: &str = "SELECT COUNT(*) FROM campaign_daily_stat_entries \
    WHERE COALESCE(sent, 0) = 0 AND COALESCE(opened, 0) = 0 AND COALESCE(replied, 0) = 0 \
    AND COALESCE(positive_replies, 0) = 0 AND COALESCE(bounced, 0) = 0";

// The rollout.

pub const ROLLOUT_STATE: &str = ROLLOUT_STATE_ROW;
/// [`ROLLOUT_STATE`], locking the row until the transaction ends (PostgreSQL; SQLite's single
/// writer serialises changes by itself).
pub const ROLLOUT_STATE_FOR_UPDATE: &str = concatcp!(ROLLOUT_STATE_ROW, " FOR UPDATE");
pub const SET_ROLLOUT: &str = "UPDATE rollout_state SET basis_points = $1, kill_switch = $2, \
    salt = $3, version = $4, updated_at = $5, shadow_sample_ppm = $6, automation = $7 WHERE id = 1";
/// Takes or renews lease `$1` for holder `$2` until `$3`, when it is free, expired (before
/// `$4`, now) or already `$2`'s; answers a row only when `$2` holds it afterwards.
pub const TAKE_LEASE: &str = "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
    ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
    WHERE leases.holder = excluded.holder OR leases.expires_at < $4 RETURNING holder";
/// Gives lease `$1` up, if holder `$2` has it.
pub const RELEASE_LEASE: &str = "DELETE FROM leases WHERE name = $1 AND holder = $2";
/// Deletes up to `$2` idempotency keys recorded before `$1` (retention).
pub const PRUNE_KEYS: &str = "DELETE FROM idempotency_keys WHERE (user_id, idempotency_key) IN \
    (SELECT user_id, idempotency_key FROM idempotency_keys WHERE recorded_at < $1 LIMIT $2)";
pub const OVERRIDES: &str = "SELECT user_id, source, actor FROM rollout_overrides";
pub const OVERRIDE_OF_USER: &str = "SELECT source FROM rollout_overrides WHERE user_id = $1";
pub const UPSERT_OVERRIDE: &str = "INSERT INTO rollout_overrides \
    (user_id, source, reason, actor, created_at) VALUES ($1, $2, $3, $4, $5) \
    ON CONFLICT (user_id) DO UPDATE SET source = excluded.source, reason = excluded.reason, \
    actor = excluded.actor, created_at = excluded.created_at";
pub const DELETE_OVERRIDE: &str = "DELETE FROM rollout_overrides WHERE user_id = $1";
pub const INSERT_AUDIT: &str = "INSERT INTO rollout_audit \
    (version, actor, at, change, before, after, reason) VALUES ($1, $2, $3, $4, $5, $6, $7)";
pub const AUDIT_PAGE: &str = "SELECT CAST(version AS BIGINT), actor, at, change, before, after, \
    reason FROM rollout_audit WHERE version < $1 ORDER BY version DESC LIMIT $2";
