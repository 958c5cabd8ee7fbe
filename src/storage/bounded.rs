//! Every storage call bounded in time, whatever the database does.
//!
//! Each backend sets its database's own statement timeout (PostgreSQL's `statement_timeout`,
//! SQLite's busy timeout), so a slow statement or a lock wait ends in the database, which rolls
//! the transaction back. That cannot help when the database stops answering while its TCP
//! connection stays open: a call would wait for as long as the operating system keeps the
//! connection. [`Bounded`] ends any call that outlives the statement timeout (plus a margin
//! that lets the database's own timeout come first) with [`StorageError::Unavailable`]; the
//! dropped transaction is rolled back (by the database when the connection closes, or by sqlx
//! before the connection is used again).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

use super::{
    AdminStore, CutoverStore, Database, EventStore, OnBoth, PhaseStore, PoolUse, Pruned,
    RepairOutcome, RetentionStore, RolloutStore, RunIssues, RunStore, StorageError, Store,
    TableSize,
};
use crate::domain::{CampaignId, DateRange, Event, EventTotals, Scope, StorageSource, UserId};
use crate::migration::ambiguous::{ResolutionRecord, ResolveOutcome, ResolveRequest};
use crate::migration::backfill::{BatchOutcome, LegacyRow};
use crate::migration::verify::VerifyOutcome;
use crate::migration::{Phase, PhaseState, Run, RunKind, RunState, Transition};
use crate::rollout::{AuditEntry, RolloutChange, RolloutSnapshot};

/// How much longer than the statement timeout a call may take before it is cut here: the
/// database's own timeout, which leaves a clear error, comes first when it still answers.
const MARGIN: Duration = Duration::from_secs(1);

/// `S` with every call (schema migrations aside) bounded by its statement timeout.
#[derive(Debug)]
pub struct Bounded<S> {
    inner: S,
}

impl<S: Store> Bounded<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    async fn bound<T>(
        &self,
        call: impl Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        let limit = self.inner.statement_timeout() + MARGIN;
        tokio::time::timeout(limit, call)
            .await
            .unwrap_or(Err(StorageError::TimedOut(limit)))
    }
}

impl<S: Store> Database for Bounded<S> {
    async fn update_schema(&self) -> Result<(), StorageError> {
        // Migrations may rightly run long (the first start on a big database).
        self.inner.update_schema().await
    }

    fn statement_timeout(&self) -> Duration {
        self.inner.statement_timeout()
    }

    fn pool_use(&self) -> Vec<PoolUse> {
        self.inner.pool_use()
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.bound(self.inner.ping()).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

impl<S: Store> EventStore for Bounded<S> {
    async fn record_events_each(&self, events: &[Event]) -> Result<Vec<bool>, StorageError> {
        self.bound(self.inner.record_events_each(events)).await
    }

    async fn campaign_totals(
        &self,
        source: StorageSource,
        user: &UserId,
        campaigns: &[CampaignId],
        range: DateRange,
    ) -> Result<HashMap<CampaignId, EventTotals>, StorageError> {
        self.bound(self.inner.campaign_totals(source, user, campaigns, range))
            .await
    }

    async fn daily_totals(
        &self,
        source: StorageSource,
        scope: &Scope,
        range: DateRange,
    ) -> Result<Vec<(NaiveDate, EventTotals)>, StorageError> {
        self.bound(self.inner.daily_totals(source, scope, range))
            .await
    }

    async fn campaign_totals_on_both(
        &self,
        user: &UserId,
        campaigns: &[CampaignId],
        range: DateRange,
    ) -> Result<OnBoth<HashMap<CampaignId, EventTotals>>, StorageError> {
        self.bound(self.inner.campaign_totals_on_both(user, campaigns, range))
            .await
    }

    async fn daily_totals_on_both(
        &self,
        scope: &Scope,
        range: DateRange,
    ) -> Result<OnBoth<Vec<(NaiveDate, EventTotals)>>, StorageError> {
        self.bound(self.inner.daily_totals_on_both(scope, range))
            .await
    }
}

impl<S: Store> PhaseStore for Bounded<S> {
    async fn phase(&self) -> Result<PhaseState, StorageError> {
        self.bound(self.inner.phase()).await
    }

    async fn transition(
        &self,
        target: Phase,
        actor: &str,
        reason: &str,
        force: bool,
    ) -> Result<PhaseState, StorageError> {
        self.bound(self.inner.transition(target, actor, reason, force))
            .await
    }

    async fn transitions(&self, limit: u32) -> Result<Vec<Transition>, StorageError> {
        self.bound(self.inner.transitions(limit)).await
    }
}

impl<S: Store> RunStore for Bounded<S> {
    async fn create_run(
        &self,
        kind: RunKind,
        actor: &str,
        dry_run: bool,
        batch_size: u32,
    ) -> Result<Run, StorageError> {
        self.bound(self.inner.create_run(kind, actor, dry_run, batch_size))
            .await
    }

    async fn run(&self, run_id: &str) -> Result<Option<Run>, StorageError> {
        self.bound(self.inner.run(run_id)).await
    }

    async fn recent_runs(&self, limit: u32) -> Result<Vec<Run>, StorageError> {
        self.bound(self.inner.recent_runs(limit)).await
    }

    async fn unfinished_backfill(
        &self,
        dry_run: bool,
        stale_after: std::time::Duration,
    ) -> Result<Option<Run>, StorageError> {
        self.bound(self.inner.unfinished_backfill(dry_run, stale_after))
            .await
    }

    async fn resume_run(&self, run_id: &str) -> Result<(), StorageError> {
        self.bound(self.inner.resume_run(run_id)).await
    }

    async fn finish_run(
        &self,
        run_id: &str,
        state: RunState,
        error: Option<&str>,
    ) -> Result<(), StorageError> {
        self.bound(self.inner.finish_run(run_id, state, error))
            .await
    }

    async fn run_issues(&self, run_id: &str, limit: u32) -> Result<RunIssues, StorageError> {
        self.bound(self.inner.run_issues(run_id, limit)).await
    }
}

impl<S: Store> CutoverStore for Bounded<S> {
    async fn backfill_batch(&self, run: &Run) -> Result<BatchOutcome, StorageError> {
        self.bound(self.inner.backfill_batch(run)).await
    }

    async fn resolve_ambiguous(
        &self,
        request: &ResolveRequest,
    ) -> Result<ResolveOutcome, StorageError> {
        self.bound(self.inner.resolve_ambiguous(request)).await
    }

    async fn resolutions(&self, limit: u32) -> Result<Vec<ResolutionRecord>, StorageError> {
        self.bound(self.inner.resolutions(limit)).await
    }

    async fn verify(
        &self,
        range: Option<DateRange>,
        sample_limit: usize,
    ) -> Result<VerifyOutcome, StorageError> {
        self.bound(self.inner.verify(range, sample_limit)).await
    }

    async fn complete_verify(
        &self,
        run_id: &str,
        outcome: &VerifyOutcome,
    ) -> Result<(), StorageError> {
        self.bound(self.inner.complete_verify(run_id, outcome))
            .await
    }
}

impl<S: Store> RolloutStore for Bounded<S> {
    async fn rollout(&self) -> Result<RolloutSnapshot, StorageError> {
        self.bound(self.inner.rollout()).await
    }

    async fn change_rollout(
        &self,
        change: &RolloutChange,
        expected_version: Option<u64>,
        actor: &str,
        reason: &str,
    ) -> Result<RolloutSnapshot, StorageError> {
        self.bound(
            self.inner
                .change_rollout(change, expected_version, actor, reason),
        )
        .await
    }

    async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StorageError> {
        self.bound(self.inner.hold_lease(name, holder, ttl)).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StorageError> {
        self.bound(self.inner.release_lease(name, holder)).await
    }

    async fn rollout_history(
        &self,
        before_version: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        self.bound(self.inner.rollout_history(before_version, limit))
            .await
    }

    fn change_feed(&self) -> Option<super::ChangeFeed> {
        self.inner.change_feed()
    }
}

impl<S: Store> AdminStore for Bounded<S> {
    async fn table_sizes(&self, tables: &[&'static str]) -> Result<Vec<TableSize>, StorageError> {
        self.bound(self.inner.table_sizes(tables)).await
    }

    async fn legacy_zero_rows(&self) -> Result<u64, StorageError> {
        self.bound(self.inner.legacy_zero_rows()).await
    }

    async fn insert_legacy_rows(&self, rows: &[LegacyRow]) -> Result<u64, StorageError> {
        self.bound(self.inner.insert_legacy_rows(rows)).await
    }

    async fn repair_rollups(
        &self,
        range: DateRange,
        apply: bool,
    ) -> Result<RepairOutcome, StorageError> {
        self.bound(self.inner.repair_rollups(range, apply)).await
    }
}

impl<S: Store> RetentionStore for Bounded<S> {
    async fn prepare_partitions(&self, from: NaiveDate, months: u32) -> Result<(), StorageError> {
        self.bound(self.inner.prepare_partitions(from, months))
            .await
    }

    async fn prune_raw(
        &self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<Option<Pruned>, StorageError> {
        self.bound(self.inner.prune_raw(cutoff, limit)).await
    }
}
