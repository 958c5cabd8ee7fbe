//! Storage code both backends run alike, written once: generic over the sqlx driver, with what
//! the code needs of a driver stated once, on the impl block. Each backend calls these with its
//! own pool or transaction and keeps only what really differs (bulk writes, locking,
//! partitions, change notifications).

use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, QueryBuilder, Type};

use super::backfill::BackfillSql;
use super::{
    AuditRow, FactsRow, PhaseRow, RolloutRow, RunIssues, RunRow, StorageError, TransitionRow,
    TransitionStep, VERIFY_CHUNK, VerifyJoinedRow, VerifyLegacyRow, VerifyNewRow, audit_entry,
    batch, mismatch_reason, new_run_id, parse_phase, plan_transition, rollout_config,
    rollout_snapshot, source_from_name, sql, transition_from_row, verify_data_from_joined,
    verify_data_from_rows,
};
use crate::domain::DateRange;
use crate::migration::ambiguous::{
    Resolution, ResolutionRecord, ResolveFilter, ResolveOutcome, ResolveRequest,
};
use crate::migration::backfill::{BatchOutcome, BatchPlan, ReadRow, ResolutionPlan, plan_batch};
use crate::migration::verify::{SetApart, VerifyData, VerifyOutcome, compare};
use crate::migration::{Phase, PhaseState, Run, RunIssue, RunKind, RunState, Transition};
use crate::rollout::{AuditEntry, RolloutChange, RolloutRefused, RolloutSnapshot};
use crate::rollout::{apply, change_user, check_change};

/// The shared queries over the driver `DB` (`Shared::<Sqlite>`, `Shared::<Postgres>`).
pub(super) struct Shared<DB>(PhantomData<DB>);

/// Whether a phase transition changed anything (a move to the current phase does not).
pub(super) enum Transitioned {
    Stayed(PhaseState),
    Moved(PhaseState),
}

impl<DB> Shared<DB>
where
    DB: Database,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<DateTime<Utc>>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> NaiveDate: Encode<'q, DB> + Type<DB>,
    for<'q> Option<NaiveDate>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (bool,): FromRow<'r, DB::Row>,
    for<'r> (String, String): FromRow<'r, DB::Row>,
    for<'r> (String, String, String): FromRow<'r, DB::Row>,
    for<'r> (String, DateTime<Utc>): FromRow<'r, DB::Row>,
    for<'r> batch::RunIssueRow: FromRow<'r, DB::Row>,
    for<'r> batch::UnresolvedRow: FromRow<'r, DB::Row>,
    for<'r> ResolutionRow: FromRow<'r, DB::Row>,
    for<'r> (i64, i64): FromRow<'r, DB::Row>,
    for<'r> (String, NaiveDate, i64): FromRow<'r, DB::Row>,
    for<'r> PhaseRow: FromRow<'r, DB::Row>,
    for<'r> FactsRow: FromRow<'r, DB::Row>,
    for<'r> TransitionRow: FromRow<'r, DB::Row>,
    for<'r> RunRow: FromRow<'r, DB::Row>,
    for<'r> RolloutRow: FromRow<'r, DB::Row>,
    for<'r> AuditRow: FromRow<'r, DB::Row>,
    for<'r> VerifyLegacyRow: FromRow<'r, DB::Row>,
    for<'r> VerifyNewRow: FromRow<'r, DB::Row>,
    for<'r> VerifyJoinedRow: FromRow<'r, DB::Row>,
    for<'r> (String, NaiveDate): FromRow<'r, DB::Row>,
    for<'r> batch::BackfillRow: FromRow<'r, DB::Row>,
    for<'r> (i64, i64, i64, i64): FromRow<'r, DB::Row>,
{
    /// Readies a database for `migrator`: notes whether the legacy table is the legacy
    /// system's, and lets migrations in `edited` pass the migrator's checksum check.
    /// `table_exists` selects whether the table `$1` exists.
    pub async fn before_schema_update(
        pool: &Pool<DB>,
        migrator: &sqlx::migrate::Migrator,
        table_exists: &str,
        edited: &[EditedMigration],
    ) -> Result<SchemaBefore, StorageError> {
        let exists = async |table: &str| -> Result<bool, StorageError> {
            let (exists,): (bool,) = sqlx::query_as(sqlx::AssertSqlSafe(table_exists.to_owned()))
                .bind(table)
                .fetch_one(pool)
                .await?;
            Ok(exists)
        };
        if exists("_sqlx_migrations").await? {
            for migration in edited {
                let shipped = hex::decode(migration.shipped_checksum).map_err(|e| {
                    StorageError::Config(format!("bad shipped checksum in the build: {e}"))
                })?;
                let Some(current) = migrator.iter().find(|m| m.version == migration.version) else {
                    continue;
                };
                sqlx::query(sql::ADOPT_EDITED_MIGRATION)
                    .bind(current.checksum.as_ref())
                    .bind(migration.version)
                    .bind(shipped.as_slice())
                    .execute(pool)
                    .await?;
            }
        }
        Ok(SchemaBefore {
            legacy_table_existed: exists("campaign_daily_stat_entries").await?,
        })
    }

    /// Finishes what the migrations leave to code: the legacy index, only on a legacy table
    /// the migrations just created (see [`sql::LEGACY_BY_USER_INDEX`]).
    pub async fn after_schema_update(
        pool: &Pool<DB>,
        before: SchemaBefore,
    ) -> Result<(), StorageError> {
        if before.legacy_table_existed {
            tracing::info!(
                "the legacy table is the legacy system's own: the service adds no index to it \
                 (see README for the index legacy reads by user want)"
            );
        } else {
            sqlx::query(sql::LEGACY_BY_USER_INDEX).execute(pool).await?;
        }
        Ok(())
    }

    pub async fn ping(pool: &Pool<DB>) -> Result<(), StorageError> {
        sqlx::query(sql::PING).execute(pool).await?;
        Ok(())
    }

    pub async fn phase(pool: &Pool<DB>) -> Result<PhaseState, StorageError> {
        let (phase, changed_at): (String, DateTime<Utc>) =
            sqlx::query_as(sql::PHASE_STATE).fetch_one(pool).await?;
        Ok(PhaseState {
            phase: parse_phase(&phase)?,
            changed_at,
        })
    }

    /// Moves the phase inside `tx`, whose phase row `read_phase` reads (and, where the
    /// backend needs it, locks). The caller commits.
    pub async fn transition(
        tx: &mut DB::Connection,
        read_phase: &'static str,
        target: Phase,
        actor: &str,
        reason: &str,
        force: bool,
    ) -> Result<Transitioned, StorageError> {
        let phase: PhaseRow = sqlx::query_as(read_phase).fetch_one(&mut *tx).await?;
        let facts: FactsRow = sqlx::query_as(sql::PRECONDITION_FACTS)
            .fetch_one(&mut *tx)
            .await?;
        let (from, at, dual_write_started_at, forced) =
            match plan_transition(phase, facts, target, force)? {
                TransitionStep::Stay(state) => return Ok(Transitioned::Stayed(state)),
                TransitionStep::Move {
                    from,
                    at,
                    dual_write_started_at,
                    forced,
                } => (from, at, dual_write_started_at, forced),
            };
        sqlx::query(sql::SET_PHASE)
            .bind(target.name())
            .bind(at)
            .bind(dual_write_started_at)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sql::INSERT_TRANSITION)
            .bind(from.name())
            .bind(target.name())
            .bind(actor)
            .bind(reason)
            .bind(at)
            .bind(forced)
            .execute(&mut *tx)
            .await?;
        if forced {
            tracing::warn!(%actor, %reason, "entered VERIFIED past unresolved ambiguous rows (forced)");
        }
        Ok(Transitioned::Moved(PhaseState {
            phase: target,
            changed_at: at,
        }))
    }

    pub async fn transitions(pool: &Pool<DB>, limit: u32) -> Result<Vec<Transition>, StorageError> {
        let rows: Vec<TransitionRow> = sqlx::query_as(sql::TRANSITIONS)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
        rows.into_iter().map(transition_from_row).collect()
    }

    pub async fn create_run(
        pool: &Pool<DB>,
        kind: RunKind,
        actor: &str,
        dry_run: bool,
        batch_size: u32,
    ) -> Result<Run, StorageError> {
        let run_id = new_run_id(kind);
        sqlx::query(sql::CREATE_RUN)
            .bind(run_id.as_str())
            .bind(kind.name())
            .bind(actor)
            .bind(dry_run)
            .bind(Utc::now())
            .bind(i64::from(batch_size))
            .execute(pool)
            .await?;
        Self::run(pool, &run_id)
            .await?
            .ok_or_else(|| StorageError::Corrupt(format!("run {run_id} vanished")))
    }

    pub async fn finish_run(
        pool: &Pool<DB>,
        run_id: &str,
        state: RunState,
        error: Option<&str>,
    ) -> Result<(), StorageError> {
        sqlx::query(sql::FINISH_RUN)
            .bind(state.name())
            .bind(Utc::now())
            .bind(error)
            .bind(run_id)
            .execute(pool)
            .await?;
        Ok(())
    }

    pub async fn run(pool: &Pool<DB>, run_id: &str) -> Result<Option<Run>, StorageError> {
        let row: Option<RunRow> = sqlx::query_as(sql::RUN_BY_ID)
            .bind(run_id)
            .fetch_optional(pool)
            .await?;
        row.map(Run::try_from).transpose()
    }

    pub async fn recent_runs(pool: &Pool<DB>, limit: u32) -> Result<Vec<Run>, StorageError> {
        let rows: Vec<RunRow> = sqlx::query_as(sql::RECENT_RUNS)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
        rows.into_iter().map(Run::try_from).collect()
    }

    pub async fn unfinished_backfill(
        pool: &Pool<DB>,
        dry_run: bool,
        stale_after: std::time::Duration,
    ) -> Result<Option<Run>, StorageError> {
        let stale_before = Utc::now() - chrono::Duration::from_std(stale_after).unwrap_or_default();
        let row: Option<RunRow> = sqlx::query_as(sql::UNFINISHED_BACKFILL)
            .bind(dry_run)
            .bind(stale_before)
            .fetch_optional(pool)
            .await?;
        row.map(Run::try_from).transpose()
    }

    pub async fn resume_run(pool: &Pool<DB>, run_id: &str) -> Result<(), StorageError> {
        sqlx::query(sql::RESUME_RUN)
            .bind(Utc::now())
            .bind(run_id)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// The last legacy key of the batch after `after`: `batch_size` keys on, or the table's
    /// last key when fewer are left; `None` when nothing is left.
    async fn batch_end(
        tx: &mut DB::Connection,
        after: &(String, NaiveDate),
        batch_size: u32,
        statements: &BackfillSql,
    ) -> Result<Option<(String, NaiveDate)>, StorageError> {
        let full: Option<(String, NaiveDate)> =
            sqlx::query_as(sqlx::AssertSqlSafe(statements.end_of_full_batch.as_str()))
                .bind(after.0.clone())
                .bind(after.1)
                .bind(i64::from(batch_size.max(1)) - 1)
                .fetch_optional(&mut *tx)
                .await?;
        if full.is_some() {
            return Ok(full);
        }
        Ok(
            sqlx::query_as(sqlx::AssertSqlSafe(statements.last_key.as_str()))
                .bind(after.0.clone())
                .bind(after.1)
                .fetch_optional(&mut *tx)
                .await?,
        )
    }

    /// Reads and, unless the run is a dry run, copies the next batch of legacy rows after the
    /// run's checkpoint inside `tx`, set-based (see [`BackfillSql`]): the clean rows are
    /// copied by `statements` without leaving the database; the rest come back judged by
    /// the backfill's rules, with what the caller still has to copy. The caller records it.
    pub async fn backfill_batch(
        tx: &mut DB::Connection,
        run: &Run,
        statements: &BackfillSql,
    ) -> Result<BatchPlan, StorageError> {
        let after = run
            .checkpoint
            .clone()
            .unwrap_or_else(batch::before_all_keys);
        let Some(end) = Self::batch_end(tx, &after, run.batch_size, statements).await? else {
            return Ok(BatchPlan::default());
        };
        let statement = |sql: &str| sqlx::AssertSqlSafe(sql.to_owned());
        let several_users: Vec<String> = sqlx::query_scalar(statement(&statements.several_users))
            .bind(after.0.clone())
            .bind(end.0.clone())
            .fetch_all(&mut *tx)
            .await?;
        let several_json = serde_json::to_string(&several_users)
            .map_err(|e| StorageError::Corrupt(format!("campaign ids as JSON: {e}")))?;
        // Every statement below reads the batch's range (after `after`, up to `end`) and
        // leaves out the campaigns under several users.
        macro_rules! in_range {
            ($query:expr) => {
                $query
                    .bind(after.0.clone())
                    .bind(after.1)
                    .bind(end.0.clone())
                    .bind(end.1)
                    .bind(several_json.clone())
            };
        }
        let (rows, non_zero, clean, clean_to_copy): (i64, i64, i64, i64) =
            in_range!(sqlx::query_as(statement(&statements.counts)))
                .fetch_one(&mut *tx)
                .await?;
        if !run.dry_run && clean_to_copy > 0 {
            for copy in &statements.copy {
                in_range!(sqlx::query(statement(copy)))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // Most batches have no row that is neither zero nor clean: nothing to read back.
        let others: Vec<batch::BackfillRow> = if non_zero > clean {
            in_range!(sqlx::query_as(statement(&statements.others)))
                .fetch_all(&mut *tx)
                .await?
        } else {
            Vec::new()
        };
        let several_users: HashSet<String> = several_users.into_iter().collect();
        let mut plan = plan_batch(batch::backfill_rows(others, &several_users));
        let outcome = &mut plan.outcome;
        outcome.processed = u64::try_from(rows).unwrap_or(0).max(outcome.processed);
        outcome.copied += u64::try_from(clean_to_copy).unwrap_or(0);
        // Zero rows, clean rows already present, and the others the rules skipped (counted
        // so, and not from the statements' own sums, so that a row a live write changed
        // between two statements is still counted once).
        outcome.skipped = outcome
            .processed
            .saturating_sub(outcome.copied + outcome.ambiguous);
        outcome.processed = outcome.copied + outcome.skipped + outcome.ambiguous;
        outcome.last_key = Some(end);
        Ok(plan)
    }

    /// Records a backfill batch inside its transaction: the rows it reported, its counts and
    /// checkpoint, and (a real run) the key range it read with what it copied: the
    /// provenance of the backfilled history.
    pub async fn record_batch(
        tx: &mut DB::Connection,
        run: &Run,
        outcome: &BatchOutcome,
        issues: &[RunIssue],
    ) -> Result<(), StorageError> {
        let run_id = run.run_id.as_str();
        Self::insert_issues(tx, run_id, issues).await?;
        if let (false, Some(last)) = (run.dry_run, &outcome.last_key) {
            let after = run
                .checkpoint
                .clone()
                .unwrap_or_else(batch::before_all_keys);
            sqlx::query(sql::INSERT_BACKFILL_BATCH)
                .bind(run_id)
                .bind(after.0)
                .bind(after.1)
                .bind(last.0.as_str())
                .bind(last.1)
                .bind(outcome.processed as i64)
                .bind(outcome.copied as i64)
                .bind(Utc::now())
                .execute(&mut *tx)
                .await?;
        }
        let (checkpoint_campaign, checkpoint_date) = outcome.last_key.clone().unzip();
        sqlx::query(sql::BATCH_PROGRESS)
            .bind(outcome.processed as i64)
            .bind(outcome.copied as i64)
            .bind(outcome.skipped as i64)
            .bind(outcome.ambiguous as i64)
            .bind(checkpoint_campaign)
            .bind(checkpoint_date)
            .bind(Utc::now())
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Records rows a run reported (a backfill's ambiguous rows, a verify's differences).
    pub async fn insert_issues(
        tx: &mut DB::Connection,
        run_id: &str,
        issues: &[RunIssue],
    ) -> Result<(), StorageError> {
        // Six parameters a row, well under either backend's limit per statement.
        for chunk in issues.chunks(2_000) {
            let mut insert = QueryBuilder::<DB>::new(sql::INSERT_RUN_ISSUES);
            insert.push_values(chunk, |mut row, issue| {
                row.push_bind(run_id.to_owned())
                    .push_bind(issue.campaign_id.clone())
                    .push_bind(issue.user_id.clone())
                    .push_bind(issue.stat_date)
                    .push_bind(issue.reason.clone())
                    .push_bind(issue.kind.map(|kind| kind.name().to_owned()));
            });
            insert.build().execute(&mut *tx).await?;
        }
        Ok(())
    }

    pub async fn run_issues(
        pool: &Pool<DB>,
        run_id: &str,
        limit: u32,
    ) -> Result<RunIssues, StorageError> {
        let rows: Vec<batch::RunIssueRow> = sqlx::query_as(sql::RUN_ISSUES)
            .bind(run_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
        let issues: Vec<RunIssue> = rows.into_iter().map(batch::run_issue_from_row).collect();
        let (resolved, all): (i64, i64) = sqlx::query_as(sql::RUN_ISSUE_COUNTS)
            .bind(run_id)
            .fetch_one(pool)
            .await?;
        Ok(RunIssues {
            issues,
            resolved: resolved.max(0) as u64,
            unresolved: (all - resolved).max(0) as u64,
        })
    }

    /// Records a verify's findings on its run (the first differences as its reported rows)
    /// and completes it.
    pub async fn complete_verify(
        tx: &mut DB::Connection,
        run_id: &str,
        outcome: &VerifyOutcome,
    ) -> Result<(), StorageError> {
        let differences: Vec<RunIssue> = outcome
            .sample
            .iter()
            .map(|m| RunIssue {
                campaign_id: m.campaign_id.clone(),
                user_id: m.user_id.clone(),
                stat_date: m.date,
                reason: mismatch_reason(m),
                kind: None,
                resolution: None,
            })
            .collect();
        Self::insert_issues(tx, run_id, &differences).await?;
        let now = Utc::now();
        sqlx::query(sql::COMPLETE_VERIFY)
            .bind(now)
            .bind(now)
            .bind((outcome.compared + outcome.ambiguous) as i64)
            .bind(outcome.compared as i64)
            .bind(outcome.mismatches as i64)
            .bind(outcome.ambiguous as i64)
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// The unresolved ambiguous rows of the last completed backfill that `filter` covers,
    /// read inside `tx` as the backfill reads legacy rows.
    pub async fn unresolved_rows(
        tx: &mut DB::Connection,
        filter: &ResolveFilter,
    ) -> Result<Vec<ReadRow>, StorageError> {
        let rows: Vec<batch::UnresolvedRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(batch::unresolved_rows_query()))
                .fetch_all(&mut *tx)
                .await?;
        let several_users: HashSet<String> = sqlx::query_scalar(sql::UNRESOLVED_SEVERAL_USERS)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        Ok(batch::unresolved_rows(rows, filter, &several_users))
    }

    /// Records a resolution inside `tx`: its audit entry and the resolution of each key it
    /// covers. Nothing is recorded when it covers no row. The caller commits.
    pub async fn record_resolution(
        tx: &mut DB::Connection,
        request: &ResolveRequest,
        plan: &ResolutionPlan,
    ) -> Result<ResolveOutcome, StorageError> {
        let mut outcome = ResolveOutcome {
            resolved: plan.keys.len() as u64,
            copied: plan.copies.len() as u64,
            ..ResolveOutcome::default()
        };
        if !plan.keys.is_empty() {
            let id: i64 = sqlx::query_scalar(sql::INSERT_RESOLUTION)
                .bind(request.resolution.name())
                .bind(request.actor.as_str())
                .bind(request.reason.as_str())
                .bind(request.filter.describe())
                .bind(outcome.resolved as i64)
                .bind(outcome.copied as i64)
                .bind(Utc::now())
                .fetch_one(&mut *tx)
                .await?;
            for chunk in plan.keys.chunks(2_000) {
                let mut insert = QueryBuilder::<DB>::new(sql::INSERT_RESOLVED_ROWS);
                insert.push_values(chunk, |mut row, (campaign, day)| {
                    row.push_bind(campaign.clone())
                        .push_bind(*day)
                        .push_bind(request.resolution.name())
                        .push_bind(id);
                });
                insert.build().execute(&mut *tx).await?;
            }
            outcome.resolution_id = id.max(0) as u64;
        }
        let unresolved: i64 = sqlx::query_scalar(sql::UNRESOLVED_COUNT)
            .fetch_one(&mut *tx)
            .await?;
        outcome.unresolved = unresolved.max(0) as u64;
        Ok(outcome)
    }

    pub async fn resolutions(
        pool: &Pool<DB>,
        limit: u32,
    ) -> Result<Vec<ResolutionRecord>, StorageError> {
        let rows: Vec<ResolutionRow> = sqlx::query_as(sql::RESOLUTIONS)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
        rows.into_iter().map(resolution_from_row).collect()
    }

    /// Compares both storages over `range` (all history when `None`), reading inside `tx` (the
    /// caller makes it one snapshot) [`VERIFY_CHUNK`] keys at a time, so that memory stays
    /// flat whatever the history's size; keeps at most `sample_limit` differences.
    pub async fn verify(
        tx: &mut DB::Connection,
        range: Option<DateRange>,
        sample_limit: usize,
    ) -> Result<VerifyOutcome, StorageError> {
        let set_apart: Vec<(String, NaiveDate, i64)> = sqlx::query_as(sql::VERIFY_AMBIGUOUS)
            .fetch_all(&mut *tx)
            .await?;
        let ambiguous: Arc<SetApart> = Arc::new(
            set_apart
                .into_iter()
                .map(|(campaign, day, resolved)| ((campaign, day), resolved != 0))
                .collect(),
        );
        let within = |query: &mut QueryBuilder<DB>, column: &str| {
            if let Some(range) = range {
                query
                    .push(format_args!(" AND {column} BETWEEN "))
                    .push_bind(range.start);
                query.push(" AND ").push_bind(range.end);
            }
        };
        let mut outcome = VerifyOutcome::default();
        let mut after = batch::before_all_keys();
        loop {
            let mut query = QueryBuilder::<DB>::new(sql::VERIFY_LEGACY_CHUNK);
            query.push("(").push_bind(after.0.clone()).push(", ");
            query.push_bind(after.1).push(")");
            within(&mut query, "l.stat_date");
            query.push(" ORDER BY l.campaign_id, l.stat_date LIMIT ");
            query.push_bind(VERIFY_CHUNK);
            let rows: Vec<VerifyJoinedRow> = query.build_query_as().fetch_all(&mut *tx).await?;
            let Some(last) = rows.last() else { break };
            after = (last.1.clone(), last.2);
            let full = rows.len() < VERIFY_CHUNK as usize;
            let ambiguous = Arc::clone(&ambiguous);
            let found = compare_off_runtime(sample_limit, move || {
                verify_data_from_joined(rows, ambiguous)
            })
            .await?;
            outcome.merge(found, sample_limit);
            if full {
                break;
            }
        }
        let mut after = (String::new(), String::new(), batch::before_all_keys().1);
        loop {
            let mut query = QueryBuilder::<DB>::new(sql::VERIFY_NEW_ONLY_CHUNK);
            query.push("(").push_bind(after.0.clone()).push(", ");
            query.push_bind(after.1.clone()).push(", ");
            query.push_bind(after.2).push(")");
            within(&mut query, "r.day");
            query.push(" ORDER BY r.user_id, r.campaign_id, r.day LIMIT ");
            query.push_bind(VERIFY_CHUNK);
            let rows: Vec<VerifyNewRow> = query.build_query_as().fetch_all(&mut *tx).await?;
            let Some(last) = rows.last() else { break };
            after = (last.0.clone(), last.1.clone(), last.2);
            let full = rows.len() < VERIFY_CHUNK as usize;
            let ambiguous = Arc::clone(&ambiguous);
            let found = compare_off_runtime(sample_limit, move || {
                verify_data_from_rows(Vec::new(), rows, ambiguous)
            })
            .await?;
            outcome.merge(found, sample_limit);
            if full {
                break;
            }
        }
        Ok(outcome)
    }

    pub async fn legacy_zero_rows(pool: &Pool<DB>) -> Result<u64, StorageError> {
        let rows: i64 = sqlx::query_scalar(sql::LEGACY_ZERO_ROWS)
            .fetch_one(pool)
            .await?;
        Ok(rows.max(0) as u64)
    }

    pub async fn rollout(pool: &Pool<DB>) -> Result<RolloutSnapshot, StorageError> {
        let row: RolloutRow = sqlx::query_as(sql::ROLLOUT_STATE).fetch_one(pool).await?;
        let overrides: Vec<(String, String, String)> =
            sqlx::query_as(sql::OVERRIDES).fetch_all(pool).await?;
        rollout_snapshot(row, overrides)
    }

    /// Applies `change` inside `tx`, whose rollout row `read_rollout` reads (and, where the
    /// backend needs it, locks): checks the expected version and the phase, writes the new
    /// state and its audit entry. The caller commits.
    pub async fn change_rollout(
        tx: &mut DB::Connection,
        read_rollout: &'static str,
        change: &RolloutChange,
        expected_version: Option<u64>,
        actor: &str,
        reason: &str,
    ) -> Result<(), StorageError> {
        let row: RolloutRow = sqlx::query_as(read_rollout).fetch_one(&mut *tx).await?;
        let current = rollout_config(&row)?;
        if let Some(expected) = expected_version.filter(|v| *v != current.version) {
            return Err(RolloutRefused::VersionConflict {
                expected,
                current: current.version,
            }
            .into());
        }
        let phase: String = sqlx::query_scalar(sql::PHASE_NAME)
            .fetch_one(&mut *tx)
            .await?;
        let current_override = match change_user(change) {
            Some(user) => {
                let source: Option<String> = sqlx::query_scalar(sql::OVERRIDE_OF_USER)
                    .bind(user)
                    .fetch_optional(&mut *tx)
                    .await?;
                source.as_deref().map(source_from_name).transpose()?
            }
            None => None,
        };
        check_change(change, parse_phase(&phase)?, &current, current_override)?;
        let now = Utc::now();
        let (next, what, before, after) = apply(change, &current, current_override, now);
        sqlx::query(sql::SET_ROLLOUT)
            .bind(i64::from(next.basis_points))
            .bind(next.kill_switch)
            .bind(next.salt.as_str())
            .bind(next.version as i64)
            .bind(now)
            .bind(next.shadow_sample_ppm.map(i64::from))
            .bind(super::automation_text(&next.automation))
            .execute(&mut *tx)
            .await?;
        let pinned = match change {
            RolloutChange::SetOverride { user_id, source } => Some((user_id, *source)),
            RolloutChange::Quarantine { user_id } => {
                Some((user_id, crate::domain::StorageSource::Legacy))
            }
            _ => None,
        };
        match change {
            _ if let Some((user_id, source)) = pinned => {
                sqlx::query(sql::UPSERT_OVERRIDE)
                    .bind(user_id.as_str())
                    .bind(source.name())
                    .bind(reason)
                    .bind(actor)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            RolloutChange::ClearOverride { user_id } => {
                sqlx::query(sql::DELETE_OVERRIDE)
                    .bind(user_id.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            _ => {}
        }
        sqlx::query(sql::INSERT_AUDIT)
            .bind(next.version as i64)
            .bind(actor)
            .bind(now)
            .bind(what)
            .bind(before)
            .bind(after)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    pub async fn hold_lease(
        pool: &Pool<DB>,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StorageError> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let held: Option<String> = sqlx::query_scalar(sql::TAKE_LEASE)
            .bind(name)
            .bind(holder)
            .bind(until)
            .bind(now)
            .fetch_optional(pool)
            .await?;
        Ok(held.is_some())
    }

    pub async fn release_lease(
        pool: &Pool<DB>,
        name: &str,
        holder: &str,
    ) -> Result<(), StorageError> {
        sqlx::query(sql::RELEASE_LEASE)
            .bind(name)
            .bind(holder)
            .execute(pool)
            .await?;
        Ok(())
    }

    pub async fn rollout_history(
        pool: &Pool<DB>,
        before_version: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        let rows: Vec<AuditRow> = sqlx::query_as(sql::AUDIT_PAGE)
            .bind(before_version.map_or(i64::MAX, |v| v as i64))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
        rows.into_iter().map(audit_entry).collect()
    }
}

/// Builds one chunk's comparison data with `data` and compares it on tokio's blocking pool,
/// so that a long verify never holds an async worker thread.
async fn compare_off_runtime(
    sample_limit: usize,
    data: impl FnOnce() -> VerifyData + Send + 'static,
) -> Result<VerifyOutcome, StorageError> {
    tokio::task::spawn_blocking(move || compare(data(), sample_limit))
        .await
        .map_err(|failed| StorageError::Corrupt(format!("verify's comparison failed: {failed}")))
}

/// A row of [`sql::RESOLUTIONS`].
pub(super) type ResolutionRow = (i64, String, String, String, String, i64, i64, DateTime<Utc>);

fn resolution_from_row(
    (id, resolution, actor, reason, filter, rows, copied, at): ResolutionRow,
) -> Result<ResolutionRecord, StorageError> {
    Ok(ResolutionRecord {
        id: id.max(0) as u64,
        resolution: Resolution::from_name(&resolution)
            .ok_or_else(|| StorageError::Corrupt(format!("unknown resolution {resolution:?}")))?,
        actor,
        reason,
        filter,
        rows: rows.max(0) as u64,
        copied: copied.max(0) as u64,
        at,
    })
}

/// A migration whose text changed after it shipped, without changing what it leaves behind
/// for a database that already ran it: its version and its checksum before the edit.
pub(super) struct EditedMigration {
    pub version: i64,
    /// SHA-384 of the text as first shipped, in hex.
    pub shipped_checksum: &'static str,
}

/// What [`Shared::before_schema_update`] found.
pub(super) struct SchemaBefore {
    /// Whether the legacy table existed before the migrations ran (the legacy system's own).
    pub legacy_table_existed: bool,
}
