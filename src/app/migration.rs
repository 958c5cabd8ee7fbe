//! The storage migration: read and move the phase, run backfills and verifies, resolve
//! ambiguous rows, report sizes.

use crate::domain::DateRange;
use crate::migration::ambiguous::{ResolutionRecord, ResolveOutcome, ResolveRequest};
use crate::migration::verify::VerifyOutcome;
use crate::migration::{Phase, PhaseState, Run, RunKind, RunState, Transition};
use crate::storage::{RunIssues, StorageError, Store, TableSize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{AppError, Jobs, RolloutView, run_backfill};

/// The migration use cases: read and move the phase, run backfills.
#[derive(Debug)]
pub struct Migration<S> {
    store: Arc<S>,
    jobs: Jobs,
    rollout: RolloutView,
    /// Backfills running in this process, by dry-run flag: one of each kind at a time.
    active: Arc<Mutex<HashMap<bool, String>>>,
}

impl<S> Clone for Migration<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            jobs: self.jobs.clone(),
            rollout: self.rollout.clone(),
            active: Arc::clone(&self.active),
        }
    }
}

/// A backfill's settings.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    pub actor: String,
    pub dry_run: bool,
    pub batch_size: u32,
    pub throttle: Duration,
}

/// Why a backfill did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartRefused {
    #[error(
        "a backfill writes the new storage only while both storages are written (DUAL_WRITE to NEW_PRIMARY); the phase is {0}"
    )]
    WrongPhase(Phase),
    #[error("backfill {0} is already running")]
    AlreadyRunning(String),
}

/// The tables of the legacy storage.
pub const LEGACY_TABLES: &[&str] = &["campaign_daily_stat_entries"];
/// The tables of the new storage.
pub const NEW_TABLES: &[&str] = &[
    "events",
    "campaign_day_totals",
    "all_day_totals",
    "idempotency_keys",
    "campaigns",
];

/// Sizes of both storages.
#[derive(Debug, Clone)]
pub struct StorageReport {
    pub legacy: Vec<TableSize>,
    pub new: Vec<TableSize>,
    pub legacy_zero_rows: u64,
}

/// Differences a verify keeps, metric by metric.
pub const VERIFY_SAMPLE: usize = 100;

/// A run left `running` with no heartbeat for this long was abandoned by a dead process.
pub const STALE_RUN_AFTER: Duration = Duration::from_secs(30);

/// Most phase changes one history read returns.
pub const MAX_TRANSITIONS_LISTED: u32 = 1_000;

impl<S: Store> Migration<S> {
    /// The use cases over `store`; background runs go to `jobs`.
    pub fn new(store: Arc<S>, jobs: Jobs, rollout: RolloutView) -> Self {
        Self {
            store,
            jobs,
            rollout,
            active: Arc::default(),
        }
    }

    /// Starts (or resumes) a backfill in the background and returns it as recorded.
    pub async fn start_backfill(&self, request: BackfillRequest) -> Result<Run, AppError> {
        let phase = self.store.phase().await?.phase;
        if !request.dry_run && !(Phase::DualWrite..=Phase::NewPrimary).contains(&phase) {
            return Err(StartRefused::WrongPhase(phase).into());
        }
        if let Some(running) = self.active_backfill(request.dry_run) {
            return Err(StartRefused::AlreadyRunning(running).into());
        }
        let run = match self
            .store
            .unfinished_backfill(request.dry_run, STALE_RUN_AFTER)
            .await?
        {
            Some(unfinished) => {
                tracing::info!(run_id = %unfinished.run_id, state = %unfinished.state, "resuming backfill from its checkpoint");
                self.store.resume_run(&unfinished.run_id).await?;
                Run {
                    batch_size: request.batch_size,
                    ..unfinished
                }
            }
            None => {
                self.store
                    .create_run(
                        RunKind::Backfill,
                        &request.actor,
                        request.dry_run,
                        request.batch_size,
                    )
                    .await?
            }
        };
        self.lock_active()
            .insert(request.dry_run, run.run_id.clone());
        let (store, active, started) = (
            Arc::clone(&self.store),
            Arc::clone(&self.active),
            run.clone(),
        );
        self.jobs.spawn(move |stop| async move {
            run_backfill(store, started, request.throttle, stop).await;
            active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&request.dry_run);
        });
        Ok(run)
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, HashMap<bool, String>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn active_backfill(&self, dry_run: bool) -> Option<String> {
        self.lock_active().get(&dry_run).cloned()
    }

    /// Compares both storages over `range` (everything when `None`), recorded as a run.
    pub async fn verify(
        &self,
        actor: &str,
        range: Option<DateRange>,
    ) -> Result<(Run, VerifyOutcome), AppError> {
        let run = self
            .store
            .create_run(RunKind::Verify, actor, false, 0)
            .await?;
        let result = async {
            let outcome = self.store.verify(range, VERIFY_SAMPLE).await?;
            self.store.complete_verify(&run.run_id, &outcome).await?;
            Ok::<_, StorageError>(outcome)
        }
        .await;
        match result {
            Ok(outcome) => {
                tracing::info!(run_id = %run.run_id, compared = outcome.compared, mismatches = outcome.mismatches, "verify completed");
                Ok((run, outcome))
            }
            Err(error) => {
                let _ = self
                    .store
                    .finish_run(&run.run_id, RunState::Failed, Some(&error.to_string()))
                    .await;
                Err(error.into())
            }
        }
    }

    /// Rows and bytes of the legacy table against the new storage's tables.
    pub async fn storage_report(&self) -> Result<StorageReport, AppError> {
        Ok(StorageReport {
            legacy: self.store.table_sizes(LEGACY_TABLES).await?,
            new: self.store.table_sizes(NEW_TABLES).await?,
            legacy_zero_rows: self.store.legacy_zero_rows().await?,
        })
    }

    /// A run by id.
    pub async fn run(&self, run_id: &str) -> Result<Option<Run>, AppError> {
        self.store.run(run_id).await.map_err(AppError::from)
    }

    /// A run with the rows it reported (at most `limit`).
    pub async fn report(
        &self,
        run_id: &str,
        limit: u32,
    ) -> Result<Option<(Run, RunIssues)>, AppError> {
        let Some(run) = self.store.run(run_id).await? else {
            return Ok(None);
        };
        let issues = self.store.run_issues(run_id, limit).await?;
        Ok(Some((run, issues)))
    }

    pub async fn state(&self) -> Result<PhaseState, AppError> {
        self.store.phase().await.map_err(AppError::from)
    }

    /// Moves to `target` (see [`crate::migration::Phase::check_transition`]; `force`: past
    /// unresolved ambiguous rows).
    pub async fn transition(
        &self,
        target: Phase,
        actor: &str,
        reason: &str,
        force: bool,
    ) -> Result<PhaseState, AppError> {
        let state = self.store.transition(target, actor, reason, force).await?;
        // This replica applies the new phase at once; the others within their refresh.
        self.rollout.refresh(self.store.as_ref()).await?;
        tracing::info!(phase = %state.phase, actor, reason, "migration phase set");
        Ok(state)
    }

    /// Resolves ambiguous rows of the last backfill as `request` says (see
    /// [`crate::storage::CutoverStore::resolve_ambiguous`]).
    pub async fn resolve(&self, request: &ResolveRequest) -> Result<ResolveOutcome, AppError> {
        let outcome = self.store.resolve_ambiguous(request).await?;
        tracing::info!(
            resolution = request.resolution.name(),
            filter = %request.filter.describe(),
            resolved = outcome.resolved,
            copied = outcome.copied,
            unresolved = outcome.unresolved,
            actor = %request.actor,
            reason = %request.reason,
            "ambiguous rows resolved"
        );
        Ok(outcome)
    }

    /// The newest `limit` resolutions (0 means 100), newest first.
    pub async fn resolutions(&self, limit: u32) -> Result<Vec<ResolutionRecord>, AppError> {
        self.store
            .resolutions(listed(limit))
            .await
            .map_err(AppError::from)
    }

    /// The newest `limit` phase changes (0 means 100), newest first.
    pub async fn history(&self, limit: u32) -> Result<Vec<Transition>, AppError> {
        self.store
            .transitions(listed(limit))
            .await
            .map_err(AppError::from)
    }
}

/// How many entries of a history a read asks for: 0 means 100, and at most
/// [`MAX_TRANSITIONS_LISTED`].
fn listed(limit: u32) -> u32 {
    if limit == 0 {
        100
    } else {
        limit.min(MAX_TRANSITIONS_LISTED)
    }
}
