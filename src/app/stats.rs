//! Recording events and reading statistics, with reads routed by the rollout.

use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;

use crate::domain::{
    Answer, CampaignId, CampaignStatsQuery, Event, Metrics, SeriesQuery, UserId, bucket_series,
};
use crate::rollout::ALL_USERS;
use crate::storage::{RecordOutcome, StorageError, Store};
use crate::telemetry::ServerMetrics;

use super::{GroupCommit, IngestError, RolloutView};

/// The statistics use cases over one store, with reads routed by the rollout.
#[derive(Debug)]
pub struct Stats<S> {
    store: Arc<S>,
    rollout: RolloutView,
    metrics: Arc<ServerMetrics>,
    group_commit: GroupCommit,
}

impl<S> Clone for Stats<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            rollout: self.rollout.clone(),
            metrics: Arc::clone(&self.metrics),
            group_commit: self.group_commit.clone(),
        }
    }
}

impl<S: Store> Stats<S> {
    /// The use cases over `store`; single events go through `group_commit`.
    pub fn new(
        store: Arc<S>,
        rollout: RolloutView,
        metrics: Arc<ServerMetrics>,
        group_commit: GroupCommit,
    ) -> Self {
        Self {
            store,
            rollout,
            metrics,
            group_commit,
        }
    }

    /// Stores one validated event, in one transaction with other callers' single events
    /// (see [`GroupCommit`]); answers whether it was a duplicate.
    pub async fn record_one(&self, event: Event) -> Result<bool, IngestError> {
        self.group_commit.record(event).await
    }

    /// Stores validated events atomically (all or none), through the same queue as single
    /// events: a batch may share its transaction with other callers' events.
    pub async fn record(&self, events: Vec<Event>) -> Result<RecordOutcome, IngestError> {
        let duplicates = self.group_commit.record_all(events).await?;
        Ok(RecordOutcome::of(&duplicates))
    }

    /// Totals of each requested campaign, in request order; zeros for a campaign without
    /// events in the range, unknown, or owned by another user.
    pub async fn campaign_stats(
        &self,
        query: &CampaignStatsQuery,
    ) -> Result<Answer<Vec<(CampaignId, Metrics)>>, StorageError> {
        let source = self.rollout.read_source(query.user.as_str());
        let started = Instant::now();
        let totals = self
            .store
            .campaign_totals(source, &query.user, &query.campaigns, query.range)
            .await?;
        self.metrics
            .observe_read("campaign_totals", source, started.elapsed());
        let value = query
            .campaigns
            .iter()
            .map(|c| (c.clone(), totals.get(c).copied().unwrap_or_default()))
            .collect();
        Ok(Answer { value, source })
    }

    /// The series of buckets a query asks for, in date order.
    pub async fn series(
        &self,
        query: &SeriesQuery,
    ) -> Result<Answer<Vec<(NaiveDate, Metrics)>>, StorageError> {
        let user = query.scope.user.as_ref().map_or(ALL_USERS, UserId::as_str);
        let source = self.rollout.read_source(user);
        let started = Instant::now();
        let daily = self
            .store
            .daily_totals(source, &query.scope, query.range)
            .await?;
        self.metrics
            .observe_read("daily_totals", source, started.elapsed());
        Ok(Answer {
            value: bucket_series(daily, query.range, query.granularity, query.fill_empty)?,
            source,
        })
    }
}
