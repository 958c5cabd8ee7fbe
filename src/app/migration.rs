//! The storage migration: read and move the phase, run backfills and verifies, resolve
//! ambiguous rows, report sizes.

use crate::domain::{DateRange, StorageSource, ValidationError, echo};
use crate::migration::ambiguous::{ResolutionRecord, ResolveOutcome, ResolveRequest};
use crate::migration::verify::VerifyOutcome;
use crate::migration::{Phase, PhaseState, Run, RunKind, RunState, Transition};
use crate::rollout::baseline;
use crate::storage::{RepairOutcome, RunIssues, StorageError, Store, TableSize};
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

use super::{AppError, Jobs, RetentionSettings, RolloutView, run_backfill};

/// The migration use cases: read and move the phase, run backfills.
/// A backfill running on this replica.
#[derive(Debug)]
struct ActiveRun {
    run_id: String,
    cancel: watch::Sender<bool>,
}

/// The longest `CancelRun` waits for the run to end before answering it as it stands.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Migration<S> {
    store: Arc<S>,
    jobs: Jobs,
    rollout: RolloutView,
    /// Backfills running in this process, by dry-run flag (one of each kind at a time): each
    /// one's id, and the signal that cancels it.
    active: Arc<Mutex<HashMap<bool, ActiveRun>>>,
    /// How long raw events are kept: a repair needs them.
    retention: RetentionSettings,
}

impl<S> Clone for Migration<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            jobs: self.jobs.clone(),
            rollout: self.rollout.clone(),
            active: Arc::clone(&self.active),
            retention: self.retention,
        }
    }
}

/// The phase as `GetMigrationState` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    pub phase: PhaseState,
    /// Where reads go for every user that neither an override nor the percentage singles
    /// out.
    pub read_source: StorageSource,
}

/// Where a [`Migration::watch_run`] stands.
struct RunWatch<S> {
    migration: Migration<S>,
    run_id: String,
    ticker: tokio::time::Interval,
    /// The state last sent.
    last: Option<Run>,
    /// A state read and not yet sent.
    next: Option<Run>,
    ended: bool,
}

impl<S: Store> RunWatch<S> {
    /// The next change of the run, and the watch after it; `None` once it has ended.
    async fn step(mut self) -> Option<(Result<Run, AppError>, Self)> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(run) = self
                .next
                .take()
                .filter(|run| self.last.as_ref() != Some(run))
            {
                self.ended = run.state.is_final();
                self.last = Some(run.clone());
                return Some((Ok(run), self));
            }
            self.ticker.tick().await;
            match self.migration.run(&self.run_id).await {
                Ok(run) => self.next = Some(run),
                Err(error) => {
                    self.ended = true;
                    return Some((Err(error), self));
                }
            }
        }
    }
}

/// The error for a run id that names no run.
fn unknown_run(run_id: &str) -> AppError {
    AppError::NotFound(format!("no run {}", echo(run_id)))
}

/// Reported rows a run report lists.
pub const REPORT_ISSUES: u32 = 1_000;

/// How often [`Migration::watch_run`] looks at the run.
pub const WATCH_RUN_EVERY: Duration = Duration::from_millis(200);

/// A backfill's settings.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    pub actor: String,
    pub dry_run: bool,
    /// Legacy rows per batch (one transaction each); 0 means [`DEFAULT_BATCH_SIZE`].
    pub batch_size: u32,
    /// Pause between batches.
    pub throttle: Duration,
}

/// Most rows one backfill batch may read.
pub const MAX_BATCH_SIZE: u32 = 50_000;
/// Batch size when the request leaves it 0.
pub const DEFAULT_BATCH_SIZE: u32 = 1_000;

impl BackfillRequest {
    /// The batch size to run with: the default for 0, refused past [`MAX_BATCH_SIZE`].
    fn checked_batch_size(&self) -> Result<u32, ValidationError> {
        match self.batch_size {
            0 => Ok(DEFAULT_BATCH_SIZE),
            n if n > MAX_BATCH_SIZE => Err(ValidationError::single(
                "batch_size",
                format!("must be at most {MAX_BATCH_SIZE}, got {n}"),
            )),
            n => Ok(n),
        }
    }
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
    #[error("backfill {0} is not running (it is {1})")]
    NotRunning(String, String),
    #[error(
        "backfill {0} runs on another replica: a backfill is cancelled through the replica that started it"
    )]
    RunningElsewhere(String),
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

/// Most entries one history read returns (phase changes, resolutions, runs).
pub const MAX_TRANSITIONS_LISTED: u32 = 1_000;

impl<S: Store> Migration<S> {
    /// The use cases over `store`; background runs go to `jobs`.
    pub fn new(store: Arc<S>, jobs: Jobs, rollout: RolloutView) -> Self {
        Self {
            store,
            jobs,
            rollout,
            active: Arc::default(),
            retention: RetentionSettings::DEFAULT,
        }
    }

    /// The same, knowing how long raw events are kept (a rollup repair needs them).
    pub fn with_retention(mut self, retention: RetentionSettings) -> Self {
        self.retention = retention;
        self
    }

    /// Compares the rollups of `range` with their sources (what the backfill copied plus
    /// the raw events) and, when `apply`, rewrites the rows that differ. Refused for days
    /// whose raw events may already be gone.
    pub async fn repair_rollups(
        &self,
        range: DateRange,
        apply: bool,
        actor: &str,
        reason: &str,
    ) -> Result<RepairOutcome, AppError> {
        if let Some(cutoff) = self.retention.cutoff(chrono::Utc::now()) {
            // The cutoff's own day is partly gone.
            let first_whole = cutoff.date_naive() + chrono::Days::new(1);
            if range.start < first_whole {
                return Err(AppError::RepairRefused(format!(
                    "raw events are kept from {first_whole} on (--raw-retention-days); \
                     start_date {} is before that",
                    range.start
                )));
            }
        }
        let outcome = self.store.repair_rollups(range, apply).await?;
        tracing::info!(
            actor,
            reason,
            apply,
            from = %range.start,
            to = %range.end,
            checked = outcome.checked,
            rows = outcome.fixes.len(),
            all_users_days = outcome.all_users_days,
            "rollup repair"
        );
        Ok(outcome)
    }

    /// Starts (or resumes) a backfill in the background and returns it as recorded.
    pub async fn start_backfill(&self, mut request: BackfillRequest) -> Result<Run, AppError> {
        request.batch_size = request.checked_batch_size()?;
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
                    resumes: unfinished.resumes + 1,
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
        let (cancel, cancelled) = watch::channel(false);
        self.lock_active().insert(
            request.dry_run,
            ActiveRun {
                run_id: run.run_id.clone(),
                cancel,
            },
        );
        let (store, active, started) = (
            Arc::clone(&self.store),
            Arc::clone(&self.active),
            run.clone(),
        );
        self.jobs.spawn(move |mut stop| async move {
            // Stopped by shutdown or by CancelRun alike: after the batch in hand.
            let (stopping, stop_signal) = watch::channel(false);
            let run = run_backfill(store, started, request.throttle, stop_signal);
            tokio::pin!(run);
            let mut cancelled = cancelled;
            let asked_to_stop = async {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    _ = cancelled.wait_for(|c| *c) => {}
                }
            };
            tokio::select! {
                _ = &mut run => {}
                () = asked_to_stop => {
                    stopping.send_replace(true);
                    run.await;
                }
            }
            active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&request.dry_run);
        });
        Ok(run)
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, HashMap<bool, ActiveRun>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn active_backfill(&self, dry_run: bool) -> Option<String> {
        self.lock_active().get(&dry_run).map(|a| a.run_id.clone())
    }

    /// The newest `limit` runs (0: 20; at most [`MAX_TRANSITIONS_LISTED`]), newest first.
    pub async fn runs(&self, limit: u32) -> Result<Vec<Run>, AppError> {
        Ok(self.store.recent_runs(listed(limit, 20)).await?)
    }

    /// Stops backfill `run_id`, running on this replica, after its current batch, and
    /// answers it once it has ended (`cancelled`; starting a backfill resumes it).
    pub async fn cancel_run(&self, run_id: &str, actor: &str) -> Result<Run, AppError> {
        let run = self.run(run_id).await?;
        let signalled = self
            .lock_active()
            .values()
            .find(|a| a.run_id == run_id)
            .map(|a| a.cancel.send_replace(true))
            .is_some();
        if !signalled {
            return Err(if run.state == RunState::Running {
                StartRefused::RunningElsewhere(run_id.to_owned())
            } else {
                StartRefused::NotRunning(run_id.to_owned(), run.state.to_string())
            }
            .into());
        }
        tracing::info!(run_id, actor, "backfill cancelled");
        // The run's last state once it ends, or as it stands after the wait.
        let updates = self.watch_run(run_id).await?;
        let ended =
            tokio::time::timeout(CANCEL_WAIT, updates.fold(None, |_, u| async { Some(u) })).await;
        match ended {
            Ok(Some(last)) => last,
            Ok(None) | Err(_) => self.run(run_id).await,
        }
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
    pub async fn run(&self, run_id: &str) -> Result<Run, AppError> {
        self.store
            .run(run_id)
            .await?
            .ok_or_else(|| unknown_run(run_id))
    }

    /// A run with the rows it reported (at most [`REPORT_ISSUES`]).
    pub async fn report(&self, run_id: &str) -> Result<(Run, RunIssues), AppError> {
        let run = self.run(run_id).await?;
        let issues = self.store.run_issues(run_id, REPORT_ISSUES).await?;
        Ok((run, issues))
    }

    /// The run as it changes, looked at every [`WATCH_RUN_EVERY`]: its state now, then each
    /// change, ending after its final state (or when the server drains).
    pub async fn watch_run(
        &self,
        run_id: &str,
    ) -> Result<impl Stream<Item = Result<Run, AppError>> + Send + 'static, AppError> {
        let first = self.run(run_id).await?;
        let mut ticker = tokio::time::interval(WATCH_RUN_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watch = RunWatch {
            migration: self.clone(),
            run_id: run_id.to_owned(),
            ticker,
            last: None,
            next: Some(first),
            ended: false,
        };
        Ok(self
            .jobs
            .until_drained(futures::stream::unfold(watch, RunWatch::step)))
    }

    /// The phase, and where reads go for users the rollout does not single out.
    pub async fn state(&self) -> Result<MigrationState, AppError> {
        Ok(self.with_reads(self.store.phase().await?))
    }

    /// `phase` with its baseline read source under this replica's rollout: the one rule
    /// that routes reads ([`crate::rollout::baseline`]).
    fn with_reads(&self, phase: PhaseState) -> MigrationState {
        let config = &self.rollout.current().rollout.config;
        MigrationState {
            read_source: baseline(phase.phase, config),
            phase,
        }
    }

    /// Moves to `target` (see [`crate::migration::Phase::check_transition`]; `force`: past
    /// unresolved ambiguous rows).
    pub async fn transition(
        &self,
        target: Phase,
        actor: &str,
        reason: &str,
        force: bool,
    ) -> Result<MigrationState, AppError> {
        let state = self.store.transition(target, actor, reason, force).await?;
        // This replica applies the new phase at once; the others within their refresh.
        self.rollout.refresh(self.store.as_ref()).await?;
        tracing::info!(phase = %state.phase, actor, reason, "migration phase set");
        Ok(self.with_reads(state))
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
            .resolutions(listed(limit, 100))
            .await
            .map_err(AppError::from)
    }

    /// The newest `limit` phase changes (0 means 100), newest first.
    pub async fn history(&self, limit: u32) -> Result<Vec<Transition>, AppError> {
        self.store
            .transitions(listed(limit, 100))
            .await
            .map_err(AppError::from)
    }
}

/// How many entries of a history a read asks for: 0 means `default`, and at most
/// [`MAX_TRANSITIONS_LISTED`].
fn listed(limit: u32, default: u32) -> u32 {
    if limit == 0 {
        default
    } else {
        limit.min(MAX_TRANSITIONS_LISTED)
    }
}
