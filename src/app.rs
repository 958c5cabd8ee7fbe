//! The use cases behind the RPCs: record events, read totals and series. Transport-free, so
//! that every entry point (gRPC today, admin tools later) shares one behaviour.

use std::sync::Arc;

use chrono::NaiveDate;

use crate::domain::{
    Answer, CampaignId, CampaignStatsQuery, Event, Metrics, SeriesQuery, StorageSource,
    bucket_series,
};
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
        let totals = self
            .store
            .campaign_totals(&query.user, &query.campaigns, query.range)
            .await?;
        let value = query
            .campaigns
            .iter()
            .map(|c| (c.clone(), totals.get(c).copied().unwrap_or_default()))
            .collect();
        Ok(Answer {
            value,
            source: StorageSource::New,
        })
    }

    /// The series of buckets a query asks for, in date order.
    pub async fn series(
        &self,
        query: &SeriesQuery,
    ) -> Result<Answer<Vec<(NaiveDate, Metrics)>>, StorageError> {
        let daily = self.store.daily_totals(&query.scope, query.range).await?;
        Ok(Answer {
            value: bucket_series(daily, query.range, query.granularity, query.fill_empty),
            source: StorageSource::New,
        })
    }
}
