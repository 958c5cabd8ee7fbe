//! The storage contract and its backends.
//!
//! [`Store`] is the contract every backend fulfils, split by concern into narrower traits;
//! [`SqliteStore`] and [`PostgresStore`] each own their pool and run their own migrations. The entry point picks
//! one backend from the database URL ([`Backend::from_url`]); everything after it is generic.
//!
//! What the backends do alike is written once: the SQL in `sql`, the query code in `shared`
//! (generic over the sqlx driver), write planning in `batch`. The backend modules keep what
//! really differs: pools, bulk writes (multi-row `VALUES` against `UNNEST`), locking,
//! partitions and change notifications.

mod backfill;
mod batch;
mod bounded;
mod error;
mod pg_copy;
mod postgres;
mod repair;
mod shared;
mod sql;
mod sqlite;

use std::collections::HashMap;
use std::future::Future;

use chrono::{DateTime, NaiveDate, Utc};

use crate::domain::{CampaignId, DateRange, Event, EventTotals, Scope, StorageSource, UserId};
use crate::migration::ambiguous::{ResolutionRecord, ResolveOutcome, ResolveRequest};
use crate::migration::backfill::{BatchOutcome, LegacyRow};
use crate::migration::verify::{SetApart, VerifyData, VerifyOutcome};
use crate::migration::{
    Phase, PhaseState, PreconditionFacts, Run, RunIssue, RunKind, RunState, Transition,
};
use crate::rollout::{AuditEntry, RolloutChange, RolloutSnapshot};

pub use bounded::Bounded;
pub use error::{LEGACY_COLUMN_MAX, LegacyOverflow, Refusal, StorageError};
pub use postgres::{PostgresStore, disable_nagle};
pub use sqlite::SqliteStore;

pub use crate::telemetry::PoolUse;

/// Pushed notice of rollout and phase changes committed by any replica.
pub struct ChangeFeed {
    /// Ticks on every change, and on every reconnect (when changes may have been missed).
    pub changes: tokio::sync::watch::Receiver<u64>,
    /// Keeps the feed flowing: its reader drives it, and dropping it ends the feed. No task of
    /// its own, so that it stops where its reader does.
    pub listen: futures::future::BoxFuture<'static, ()>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("changes", &*self.changes.borrow())
            .finish_non_exhaustive()
    }
}

/// The use of `pool`, named `name`, for the metrics.
pub(crate) fn pool_use<DB: sqlx::Database>(name: &'static str, pool: &sqlx::Pool<DB>) -> PoolUse {
    PoolUse {
        pool: name,
        size: pool.size(),
        idle: u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
        max: pool.options().get_max_connections(),
    }
}

/// The size of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSize {
    pub table: &'static str,
    pub rows: u64,
    pub bytes: u64,
}

/// The rows a run reported (as many as asked for), and how many of all of them are resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunIssues {
    pub issues: Vec<RunIssue>,
    /// All the run's reported rows with a resolution.
    pub resolved: u64,
    /// All the run's reported rows without one.
    pub unresolved: u64,
}

/// What a write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordOutcome {
    /// Events newly stored and counted.
    pub stored: u64,
    /// Events skipped because their idempotency key had been seen already.
    pub duplicates: u64,
}

impl RecordOutcome {
    /// The counts of a batch whose events were duplicates where `duplicates` says so.
    pub fn of(duplicates: &[bool]) -> Self {
        let repeated = duplicates.iter().filter(|d| **d).count() as u64;
        Self {
            stored: duplicates.len() as u64 - repeated,
            duplicates: repeated,
        }
    }
}

impl std::ops::AddAssign for RecordOutcome {
    fn add_assign(&mut self, other: Self) {
        self.stored += other.stored;
        self.duplicates += other.duplicates;
    }
}

/// The storage contract, whole: what the server needs from a database. One backend holds
/// both storages (the legacy table and the new event store) in one database, so that a
/// write to both is one transaction.
///
/// It is split by concern ([`EventStore`], [`PhaseStore`], [`RunStore`], [`CutoverStore`],
/// [`RolloutStore`], [`AdminStore`], all over [`Database`]), so that each part of the service
/// asks for what it uses. Every method is one short unit of work; writes are atomic.
pub trait Store:
    EventStore + PhaseStore + RunStore + CutoverStore + RolloutStore + AdminStore + RetentionStore
{
}

impl<T> Store for T where
    T: EventStore
        + PhaseStore
        + RunStore
        + CutoverStore
        + RolloutStore
        + AdminStore
        + RetentionStore
{
}

/// What one retention step removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Raw-event partitions dropped whole (PostgreSQL), by name.
    pub partitions: Vec<String>,
    /// Raw events deleted one by one (SQLite; rows PostgreSQL put in its default partition).
    pub events: u64,
    /// Idempotency keys recorded before the cutoff.
    pub keys: u64,
}

/// Raw events are kept for a while; rollups forever.
pub trait RetentionStore: Database {
    /// Makes sure the raw events of `months` months from the month of `from` have partitions
    /// of their own (PostgreSQL; nothing to do elsewhere).
    fn prepare_partitions(
        &self,
        from: NaiveDate,
        months: u32,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// One step of retention: raw events that occurred before `cutoff` and idempotency keys
    /// recorded before it, at most `limit` rows of each (and every partition wholly before
    /// it); rollups are not touched. `None` when another replica is pruning at this moment.
    fn prune_raw(
        &self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> impl Future<Output = Result<Option<Pruned>, StorageError>> + Send;
}

/// The database itself: schema, health, pools.
pub trait Database: Send + Sync + 'static {
    /// Brings the schema up to date. Safe to run on every start and from several replicas.
    fn update_schema(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// The longest one statement may run (see [`PoolOptions::statement_timeout`]).
    fn statement_timeout(&self) -> std::time::Duration;

    /// How the connection pools are used now.
    fn pool_use(&self) -> Vec<PoolUse>;

    /// Succeeds while the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Closes the pools once in-flight work is done.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// Events and the reads over both storages.
pub trait EventStore: Database {
    /// Stores `events` in one transaction, in the storages the current migration phase
    /// writes (read in that same transaction): either every event is stored (or recognised
    /// as a duplicate by its idempotency key) everywhere it belongs, or nothing is.
    ///
    /// Refuses the whole batch with [`Refusal::NotOwner`] when an event
    /// names a campaign that belongs to another user; a campaign belongs to the first user
    /// that records an event for it, or to its user in the legacy table.
    ///
    /// Answers, event by event, whether it was a duplicate.
    fn record_events_each(
        &self,
        events: &[Event],
    ) -> impl Future<Output = Result<Vec<bool>, StorageError>> + Send;

    /// [`Self::record_events_each`], counted.
    fn record_events(
        &self,
        events: &[Event],
    ) -> impl Future<Output = Result<RecordOutcome, StorageError>> + Send {
        async move {
            let duplicates = self.record_events_each(events).await?;
            Ok(RecordOutcome::of(&duplicates))
        }
    }

    /// Totals of each of `user`'s `campaigns` over `range`, from `source`. Campaigns without
    /// events (or that belong to another user) are absent from the map.
    fn campaign_totals(
        &self,
        source: StorageSource,
        user: &UserId,
        campaigns: &[CampaignId],
        range: DateRange,
    ) -> impl Future<Output = Result<HashMap<CampaignId, EventTotals>, StorageError>> + Send;

    /// Totals per day over `range` for the campaigns of `scope`, from `source`, in date
    /// order; days without events are absent.
    fn daily_totals(
        &self,
        source: StorageSource,
        scope: &Scope,
        range: DateRange,
    ) -> impl Future<Output = Result<Vec<(NaiveDate, EventTotals)>, StorageError>> + Send;

    /// [`Self::campaign_totals`] from both storages in one snapshot. A write lands in both
    /// storages in one transaction, so a difference between the two answers is one that no
    /// concurrent write explains.
    fn campaign_totals_on_both(
        &self,
        user: &UserId,
        campaigns: &[CampaignId],
        range: DateRange,
    ) -> impl Future<Output = Result<OnBoth<HashMap<CampaignId, EventTotals>>, StorageError>> + Send;

    /// [`Self::daily_totals`] from both storages in one snapshot (see
    /// [`Self::campaign_totals_on_both`]).
    fn daily_totals_on_both(
        &self,
        scope: &Scope,
        range: DateRange,
    ) -> impl Future<Output = Result<OnBoth<Vec<(NaiveDate, EventTotals)>>, StorageError>> + Send;
}

/// One read's answers from each storage, taken in one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnBoth<T> {
    pub legacy: T,
    pub new: T,
}

/// The migration phase and its history.
pub trait PhaseStore: Database {
    /// The current migration phase.
    fn phase(&self) -> impl Future<Output = Result<PhaseState, StorageError>> + Send;

    /// Moves to `target` if [`Phase::check_transition`] allows it (`force`: past unresolved
    /// ambiguous rows), recording who, when, why and whether it was forced in the same
    /// transaction. Moving to the current phase changes nothing.
    fn transition(
        &self,
        target: Phase,
        actor: &str,
        reason: &str,
        force: bool,
    ) -> impl Future<Output = Result<PhaseState, StorageError>> + Send;

    /// The recorded phase changes, newest first, at most `limit`.
    fn transitions(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Transition>, StorageError>> + Send;
}

/// Backfill and verify runs as recorded.
pub trait RunStore: Database {
    /// Records a new run, in state `running`.
    fn create_run(
        &self,
        kind: RunKind,
        actor: &str,
        dry_run: bool,
        batch_size: u32,
    ) -> impl Future<Output = Result<Run, StorageError>> + Send;

    /// A run by id.
    fn run(&self, run_id: &str) -> impl Future<Output = Result<Option<Run>, StorageError>> + Send;

    /// The newest `limit` runs, newest first.
    fn recent_runs(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Run>, StorageError>> + Send;

    /// The newest backfill run of this `dry_run` kind that has not completed: cancelled,
    /// failed, or running without a heartbeat for `stale_after` (its process died).
    fn unfinished_backfill(
        &self,
        dry_run: bool,
        stale_after: std::time::Duration,
    ) -> impl Future<Output = Result<Option<Run>, StorageError>> + Send;

    /// Marks a run `running` again (heartbeat now) to resume it.
    fn resume_run(&self, run_id: &str) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Ends a run.
    fn finish_run(
        &self,
        run_id: &str,
        state: RunState,
        error: Option<&str>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// The rows a run reported, oldest first, at most `limit`, with how many of all its
    /// rows are resolved.
    fn run_issues(
        &self,
        run_id: &str,
        limit: u32,
    ) -> impl Future<Output = Result<RunIssues, StorageError>> + Send;
}

/// Moving history between the storages: backfill batches, verify, resolutions of ambiguous rows.
pub trait CutoverStore: Database {
    /// Copies the next `batch_size` legacy rows after the run's checkpoint (in
    /// `(campaign_id, stat_date)` order) into the new storage, as
    /// [`crate::migration::backfill::plan_batch`] plans them, and advances the run's counters
    /// and checkpoint, all in one transaction. A dry run only counts and reports.
    fn backfill_batch(
        &self,
        run: &Run,
    ) -> impl Future<Output = Result<BatchOutcome, StorageError>> + Send;

    /// Resolves the unresolved ambiguous rows of the last completed backfill that `request`
    /// covers, in one transaction: COPY adds what they lack to the new storage (refused as a
    /// whole when a row cannot be copied), SKIP leaves them out on purpose; both are kept per
    /// legacy key and audited.
    fn resolve_ambiguous(
        &self,
        request: &ResolveRequest,
    ) -> impl Future<Output = Result<ResolveOutcome, StorageError>> + Send;

    /// Audited resolutions, newest first, at most `limit`.
    fn resolutions(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ResolutionRecord>, StorageError>> + Send;

    /// Compares both storages over `range` (everything when `None`) per `(user, campaign,
    /// day)`, in one snapshot and in bounded memory, setting apart the keys the last completed
    /// backfill reported as ambiguous; keeps at most `sample_limit` differences.
    fn verify(
        &self,
        range: Option<DateRange>,
        sample_limit: usize,
    ) -> impl Future<Output = Result<VerifyOutcome, StorageError>> + Send;

    /// Records a verify's findings on its run and completes it.
    fn complete_verify(
        &self,
        run_id: &str,
        outcome: &VerifyOutcome,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
}

/// The stored, versioned rollout.
pub trait RolloutStore: Database {
    /// The rollout as stored, with every per-user override.
    fn rollout(&self) -> impl Future<Output = Result<RolloutSnapshot, StorageError>> + Send;

    /// Applies `change` if the current version is `expected_version` (when given) and the
    /// phase allows it ([`crate::rollout::check_change`]); bumps the version and writes the
    /// audit entry in the same transaction. Returns the rollout after the change.
    fn change_rollout(
        &self,
        change: &RolloutChange,
        expected_version: Option<u64>,
        actor: &str,
        reason: &str,
    ) -> impl Future<Output = Result<RolloutSnapshot, StorageError>> + Send;

    /// Audited changes, newest first, older than `before_version` when given, at most `limit`.
    fn rollout_history(
        &self,
        before_version: Option<u64>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, StorageError>> + Send;

    /// Takes or renews the lease `name` for `holder` for `ttl`, if it is free, expired or
    /// already `holder`'s: true when `holder` holds it now. Exactly one holder at a time
    /// does the job a lease names (the schedule's driver).
    fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// Gives the lease `name` up, if `holder` holds it.
    fn release_lease(
        &self,
        name: &str,
        holder: &str,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// A feed that ticks whenever any replica commits a rollout or phase change, where the
    /// backend can push one (PostgreSQL: LISTEN/NOTIFY). `None`: replicas rely on polling.
    fn change_feed(&self) -> Option<ChangeFeed> {
        None
    }
}

/// Storage sizes and the legacy data generator.
pub trait AdminStore: Database {
    /// Rows and bytes (indexes included) of each of `tables`, in order.
    fn table_sizes(
        &self,
        tables: &[&'static str],
    ) -> impl Future<Output = Result<Vec<TableSize>, StorageError>> + Send;

    /// Legacy rows whose five counts are all zero.
    fn legacy_zero_rows(&self) -> impl Future<Output = Result<u64, StorageError>> + Send;

    /// Writes rows straight into the legacy table, as the legacy system did (for the data
    /// generator); rows whose `(campaign, day)` exists are left alone. Returns rows written.
    fn insert_legacy_rows(
        &self,
        rows: &[LegacyRow],
    ) -> impl Future<Output = Result<u64, StorageError>> + Send;

    /// Compares the rollups of `range` with their sources (backfilled history plus raw
    /// events) and, when `apply`, rewrites the rows that differ and the all-users days
    /// around them, in one transaction that writes wait for.
    fn repair_rollups(
        &self,
        range: DateRange,
        apply: bool,
    ) -> impl Future<Output = Result<RepairOutcome, StorageError>> + Send;
}

/// What a rollup repair found (and fixed, when applied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairOutcome {
    /// Campaign rows that differ from their sources, in key order.
    pub fixes: Vec<crate::domain::RollupFix>,
    /// Days whose all-users totals differ from the sum of their (repaired) campaign rows.
    pub all_users_days: u64,
    /// Campaign rows compared.
    pub checked: u64,
}

/// The phase stored under `name`.
fn parse_phase(name: &str) -> Result<Phase, StorageError> {
    Phase::from_name(name)
        .ok_or_else(|| StorageError::Corrupt(format!("unknown migration phase {name:?}")))
}

/// The stored phase: name, when it changed, when DUAL_WRITE was last entered.
type PhaseRow = (
    String,
    chrono::DateTime<chrono::Utc>,
    Option<chrono::DateTime<chrono::Utc>>,
);

/// A row of [`sql::PRECONDITION_FACTS`].
type FactsRow = (
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
    i64,
);

/// What a transition does once the stored phase and facts are read.
enum TransitionStep {
    /// Already in the target phase: nothing changes.
    Stay(PhaseState),
    /// Move: write the new phase and record the change.
    Move {
        from: Phase,
        at: chrono::DateTime<chrono::Utc>,
        dual_write_started_at: Option<chrono::DateTime<chrono::Utc>>,
        /// Forced past unresolved ambiguous rows.
        forced: bool,
    },
}

/// Decides a transition to `target` (the same for every backend).
fn plan_transition(
    (current, changed_at, dual_write_started_at): PhaseRow,
    (last_backfill_at, last_clean_verify_at, unresolved_ambiguous): FactsRow,
    target: Phase,
    force: bool,
) -> Result<TransitionStep, StorageError> {
    let current = parse_phase(&current)?;
    if current == target {
        return Ok(TransitionStep::Stay(PhaseState {
            phase: current,
            changed_at,
        }));
    }
    let facts = PreconditionFacts {
        dual_write_started_at,
        last_backfill_at,
        last_clean_verify_at,
        unresolved_ambiguous: stored(unresolved_ambiguous, "unresolved ambiguous rows")?,
    };
    let forced = current.check_transition(target, &facts, force)?;
    let at = chrono::Utc::now();
    Ok(TransitionStep::Move {
        from: current,
        at,
        // Entering DUAL_WRITE from below starts it anew: backfills count from here.
        dual_write_started_at: if target == Phase::DualWrite && current < target {
            Some(at)
        } else {
            dual_write_started_at
        },
        forced,
    })
}

/// A stored transition row: from, to, actor, reason, when, forced.
type TransitionRow = (
    String,
    String,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
    bool,
);

fn transition_from_row(
    (from, to, actor, reason, at, forced): TransitionRow,
) -> Result<Transition, StorageError> {
    Ok(Transition {
        from: parse_phase(&from)?,
        to: parse_phase(&to)?,
        actor,
        reason,
        at,
        forced,
    })
}

/// A `migration_runs` row.
#[derive(Debug, sqlx::FromRow)]
struct RunRow {
    run_id: String,
    kind: String,
    actor: String,
    dry_run: bool,
    state: String,
    started_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    batch_size: i64,
    processed: i64,
    copied: i64,
    skipped: i64,
    ambiguous: i64,
    failed: i64,
    compared: i64,
    mismatches: i64,
    checkpoint_campaign: Option<String>,
    checkpoint_date: Option<NaiveDate>,
    last_error: Option<String>,
    resumes: i64,
}

impl TryFrom<RunRow> for Run {
    type Error = StorageError;

    fn try_from(row: RunRow) -> Result<Self, StorageError> {
        let count = |n: i64| stored::<u64>(n, "run count");
        Ok(Run {
            kind: RunKind::from_name(&row.kind)
                .ok_or_else(|| StorageError::Corrupt(format!("unknown run kind {:?}", row.kind)))?,
            state: RunState::from_name(&row.state).ok_or_else(|| {
                StorageError::Corrupt(format!("unknown run state {:?}", row.state))
            })?,
            run_id: row.run_id,
            actor: row.actor,
            dry_run: row.dry_run,
            started_at: row.started_at,
            finished_at: row.finished_at,
            batch_size: stored(row.batch_size, "run batch size")?,
            processed: count(row.processed)?,
            copied: count(row.copied)?,
            skipped: count(row.skipped)?,
            ambiguous: count(row.ambiguous)?,
            failed: count(row.failed)?,
            compared: count(row.compared)?,
            mismatches: count(row.mismatches)?,
            checkpoint: row.checkpoint_campaign.zip(row.checkpoint_date),
            last_error: row.last_error,
            resumes: stored(row.resumes, "run resumes")?,
        })
    }
}

/// A new run id, e.g. `backfill-0193…`: unique, and ordered by start time.
fn new_run_id(kind: RunKind) -> String {
    format!("{}-{}", kind.name(), uuid::Uuid::now_v7())
}

/// A verify legacy row.
type VerifyLegacyRow = (String, String, NaiveDate, i64, i64, i64, i64, i64);
/// A verify rollup row: user, campaign, day and the five shared totals.
type VerifyNewRow = VerifyLegacyRow;

/// Legacy keys (and new-only keys) verify reads at a time.
const VERIFY_CHUNK: i64 = 10_000;

/// A row of [`sql::VERIFY_LEGACY_CHUNK`]: the key, legacy's five counts and the new storage's.
type VerifyJoinedRow = (
    String,
    String,
    NaiveDate,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

/// One chunk of [`sql::VERIFY_LEGACY_CHUNK`] as the data [`crate::migration::verify::compare`]
/// takes.
fn verify_data_from_joined(
    rows: Vec<VerifyJoinedRow>,
    ambiguous: std::sync::Arc<SetApart>,
) -> VerifyData {
    let (legacy, new) = rows
        .into_iter()
        .map(|(u, c, d, s, o, r, p, b, ns, no, nr, np, nb)| {
            (
                (u.clone(), c.clone(), d, s, o, r, p, b),
                (u, c, d, ns, no, nr, np, nb),
            )
        })
        .unzip();
    verify_data_from_rows(legacy, new, ambiguous)
}

fn verify_data_from_rows(
    legacy: Vec<VerifyLegacyRow>,
    new: Vec<VerifyNewRow>,
    ambiguous: std::sync::Arc<SetApart>,
) -> VerifyData {
    VerifyData {
        legacy: legacy
            .into_iter()
            .map(|(u, c, d, s, o, r, p, b)| ((u, c, d), [s, o, r, p, b]))
            .collect(),
        new: new
            .into_iter()
            .flat_map(|(u, c, d, s, o, r, p, b)| {
                // The codes of the five shared event types, in legacy column order.
                [(1, s), (2, o), (4, r), (5, p), (6, b)]
                    .into_iter()
                    .filter(|(_, total)| *total != 0)
                    .map(move |(t, n)| ((u.clone(), c.clone(), d), t, n))
            })
            .collect(),
        ambiguous,
    }
}

/// How a verify mismatch is kept in the run's report.
fn mismatch_reason(m: &crate::migration::verify::Mismatch) -> String {
    format!("{}: legacy {}, new {}", m.metric, m.legacy, m.new)
}

/// A row of [`sql::ROLLOUT_STATE`].
type RolloutRow = (
    i64,
    bool,
    String,
    i64,
    chrono::DateTime<chrono::Utc>,
    Option<i64>,
    Option<String>,
);

/// The automation document as stored (`None`: nothing set).
fn automation_text(automation: &crate::rollout::Automation) -> Option<String> {
    (*automation != crate::rollout::Automation::default())
        .then(|| serde_json::to_string(automation).expect("automation serialises"))
}

fn rollout_config(
    (basis_points, kill_switch, salt, version, _, shadow_sample_ppm, automation): &RolloutRow,
) -> Result<crate::rollout::RolloutConfig, StorageError> {
    Ok(crate::rollout::RolloutConfig {
        basis_points: stored(*basis_points, "rollout basis points")?,
        kill_switch: *kill_switch,
        salt: salt.clone(),
        version: stored(*version, "rollout version")?,
        shadow_sample_ppm: shadow_sample_ppm
            .map(|ppm| stored(ppm, "shadow sample rate"))
            .transpose()?,
        automation: automation
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| StorageError::Corrupt(format!("rollout automation: {e}")))?
            .unwrap_or_default(),
    })
}

/// A stored integer as the type it must fit; a value that does not is corrupt data, never
/// read as zero.
fn stored<T: TryFrom<i64>>(value: i64, what: &str) -> Result<T, StorageError> {
    T::try_from(value).map_err(|_| StorageError::Corrupt(format!("{what} {value} out of range")))
}

fn source_from_name(name: &str) -> Result<StorageSource, StorageError> {
    StorageSource::from_name(name)
        .ok_or_else(|| StorageError::Corrupt(format!("unknown storage {name:?}")))
}

fn rollout_snapshot(
    row: RolloutRow,
    overrides: Vec<(String, String, String)>,
) -> Result<RolloutSnapshot, StorageError> {
    let quarantined = overrides
        .iter()
        .filter(|(_, _, actor)| actor == crate::rollout::GUARD_ACTOR)
        .map(|(user, _, _)| user.clone())
        .collect();
    Ok(RolloutSnapshot {
        config: rollout_config(&row)?,
        updated_at: row.4,
        overrides: overrides
            .into_iter()
            .map(|(user, source, _)| Ok((user, source_from_name(&source)?)))
            .collect::<Result<_, StorageError>>()?,
        quarantined,
    })
}

/// An audit row: version, actor, at, change, before, after, reason.
type AuditRow = (
    i64,
    String,
    chrono::DateTime<chrono::Utc>,
    String,
    String,
    String,
    String,
);

fn audit_entry(
    (version, actor, at, change, before, after, reason): AuditRow,
) -> Result<AuditEntry, StorageError> {
    Ok(AuditEntry {
        version: stored(version, "audit version")?,
        actor,
        at,
        change,
        before,
        after,
        reason,
    })
}

/// A database URL, which may hold a password: `Debug` shows it with the password hidden, and
/// only [`DatabaseUrl::expose`] gives it whole (to connect).
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The whole URL, password included: for connecting, never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        Ok(Self(url.to_owned()))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut url) => {
                if url.password().is_some() {
                    // Only fails for URLs that cannot have a password, which this one has.
                    let _ = url.set_password(Some("***"));
                }
                f.debug_tuple("DatabaseUrl").field(&url.as_str()).finish()
            }
            Err(_) => f.write_str("DatabaseUrl(<not a URL>)"),
        }
    }
}

/// The database backends, told apart by the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a database URL names: `sqlite:` or `postgres:`/`postgresql:`.
    pub fn from_url(url: &str) -> Result<Self, StorageError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => Err(StorageError::Config(format!(
                "unsupported database URL scheme {scheme:?}: use sqlite:// or postgres://"
            ))),
        }
    }
}

/// Pool settings shared by the backends.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Most connections a pool opens.
    pub max_connections: u32,
    /// How long a call waits for a connection before it fails as unavailable.
    pub acquire_timeout: std::time::Duration,
    /// The longest one database statement may run (a lock wait included): past it, the call
    /// fails as unavailable and its transaction is rolled back. See [`Bounded`].
    pub statement_timeout: std::time::Duration,
}

impl PoolOptions {
    /// The defaults, in one place: the command line shows and uses these.
    pub const DEFAULT: Self = Self {
        max_connections: 16,
        acquire_timeout: std::time::Duration::from_secs(5),
        statement_timeout: std::time::Duration::from_secs(10),
    };

    /// A pooled connection that has sat idle this long is pinged before a call gets it.
    pub const PING_IF_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

    /// sqlx's pool settings for these options.
    ///
    /// sqlx pings every connection it hands out by default: a round trip to the database
    /// before every read and every write transaction, on the caller's time. Here only a
    /// connection idle for [`Self::PING_IF_IDLE_FOR`] or more is pinged (so that one left
    /// over from before a database restart in a quiet spell costs no call); one in use a
    /// moment ago is handed out as it is. If it broke since, its call fails as UNAVAILABLE,
    /// which clients retry, and sqlx closes it when it comes back (it pings on release).
    pub(crate) fn sqlx<DB: sqlx::Database>(&self) -> sqlx::pool::PoolOptions<DB> {
        sqlx::pool::PoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= Self::PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
    }
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_hides_its_password_when_debugged() {
        let url: DatabaseUrl = "postgres://stats:s3cret@db:5432/stats"
            .parse()
            .expect("URL");
        let shown = format!("{url:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://stats:***@db:5432/stats"),
            "{shown}"
        );
        assert_eq!(url.expose(), "postgres://stats:s3cret@db:5432/stats");
        let file: DatabaseUrl = "sqlite://campaign-stats.db".parse().expect("URL");
        assert!(format!("{file:?}").contains("sqlite://campaign-stats.db"));
    }

    #[test]
    fn a_stored_value_out_of_range_is_corrupt_not_zero() {
        let row: RolloutRow = (1_250, false, "s".into(), -1, chrono::Utc::now(), None, None);
        assert!(matches!(
            rollout_config(&row),
            Err(StorageError::Corrupt(_))
        ));
        let row: RolloutRow = (
            1_250,
            false,
            "s".into(),
            7,
            chrono::Utc::now(),
            Some(-5),
            None,
        );
        assert!(matches!(
            rollout_config(&row),
            Err(StorageError::Corrupt(_))
        ));
        let row: RolloutRow = (
            1_250,
            false,
            "s".into(),
            7,
            chrono::Utc::now(),
            Some(50),
            None,
        );
        let config = rollout_config(&row).expect("a valid row");
        assert_eq!(
            (
                config.basis_points,
                config.version,
                config.shadow_sample_ppm
            ),
            (1_250, 7, Some(50))
        );
        assert!(matches!(
            stored::<u32>(i64::from(u32::MAX) + 1, "batch size"),
            Err(StorageError::Corrupt(_))
        ));
    }
}
