//! The use cases behind the RPCs: record events, read totals and series, move the
//! migration phase. Transport-free, so
//! that every entry point (gRPC today, admin tools later) shares one behaviour.

use std::sync::Arc;

use chrono::NaiveDate;

use crate::domain::{
    Answer, CampaignId, CampaignStatsQuery, Event, Metrics, SeriesQuery, StorageSource,
    bucket_series,
};
use crate::migration::{Phase, PhaseState, Transition};
use crate::storage::{EventStore, RecordOutcome, StorageError};

/// The statistics use cases over one store.
#[derive(Debug)]
pub struct Stats<S> {
    store: Arc<S>,
}

impl<S> Clone for Stats<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
        }
    }
}

impl<S: EventStore> Stats<S> {
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }

    /// The storage reads come from in the current migration phase.
    async fn read_source(&self) -> Result<StorageSource, StorageError> {
        Ok(self.store.phase().await?.phase.read_source())
    }

    /// Stores validated events atomically; see [`EventStore::record_events`].
    pub async fn record(&self, events: &[Event]) -> Result<RecordOutcome, StorageError> {
        if events.is_empty() {
            return Ok(RecordOutcome::default());
        }
        self.store.record_events(events).await
    }

    /// Totals of each requested campaign, in request order; zeros for a campaign without
    /// events in the range, unknown, or owned by another user.
    pub async fn campaign_stats(
        &self,
        query: &CampaignStatsQuery,
    ) -> Result<Answer<Vec<(CampaignId, Metrics)>>, StorageError> {
        let source = self.read_source().await?;
        let totals = self
            .store
            .campaign_totals(source, &query.user, &query.campaigns, query.range)
            .await?;
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
        let source = self.read_source().await?;
        let daily = self
            .store
            .daily_totals(source, &query.scope, query.range)
            .await?;
        Ok(Answer {
            value: bucket_series(daily, query.range, query.granularity, query.fill_empty),
            source,
        })
    }
}

/// The migration use cases: read and move the phase.
#[derive(Debug)]
pub struct Migration<S> {
    store: Arc<S>,
}

impl<S> Clone for Migration<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
        }
    }
}

/// Most phase changes one history read returns.
pub const MAX_TRANSITIONS_LISTED: u32 = 1_000;

impl<S: EventStore> Migration<S> {
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }

    pub async fn state(&self) -> Result<PhaseState, StorageError> {
        self.store.phase().await
    }

    /// Moves to `target` (see [`crate::migration::Phase::check_transition`]).
    pub async fn transition(
        &self,
        target: Phase,
        actor: &str,
        reason: &str,
    ) -> Result<PhaseState, StorageError> {
        let state = self.store.transition(target, actor, reason).await?;
        tracing::info!(phase = %state.phase, actor, reason, "migration phase set");
        Ok(state)
    }

    /// The newest `limit` phase changes (0 means 100), newest first.
    pub async fn history(&self, limit: u32) -> Result<Vec<Transition>, StorageError> {
        let limit = if limit == 0 {
            100
        } else {
            limit.min(MAX_TRANSITIONS_LISTED)
        };
        self.store.transitions(limit).await
    }
}
