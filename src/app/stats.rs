//! Recording events and reading statistics, with reads routed by the rollout.

use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;

use crate::domain::{
    Answer, CampaignId, CampaignStatsQuery, Event, EventTotals, SeriesQuery, UserId, bucket_series,
};
use crate::rollout::ALL_USERS;
use crate::storage::{RecordOutcome, Store};
use crate::telemetry::{CAMPAIGN_TOTALS, DAILY_TOTALS, ServerMetrics};
use futures::{Stream, StreamExt};

use super::{AppError, GroupCommit, Guard, RolloutView, Shadow, ShadowRead};

/// How many streamed events are written together by [`Stats::record_stream`].
pub const STREAM_CHUNK_EVENTS: usize = 1_000;

/// Full chunks of a stream that may wait for the writer while the next is read: with the
/// chunk being written and the one being read, at most three chunks per stream are held.
const QUEUED_CHUNKS: usize = 1;

/// What a stream of events left behind.
#[derive(Debug)]
pub struct StreamRecorded<E> {
    /// What was stored (or found to be a duplicate) before the stream ended or failed.
    pub stored: RecordOutcome,
    /// Why the stream stopped early, if it did.
    pub failure: Option<StreamFailure<E>>,
}

/// Why recording a stream stopped early.
#[derive(Debug)]
pub enum StreamFailure<E> {
    /// The source failed (a bad event, a broken transport).
    Source(E),
    /// A chunk was not stored; the positions it names are the stream's.
    Write(AppError),
}

/// The statistics use cases over one store, with reads routed by the rollout.
#[derive(Debug)]
pub struct Stats<S> {
    store: Arc<S>,
    rollout: RolloutView,
    metrics: Arc<ServerMetrics>,
    group_commit: GroupCommit,
    shadow: Option<Shadow>,
    guard: Option<Guard>,
}

impl<S> Clone for Stats<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            rollout: self.rollout.clone(),
            metrics: Arc::clone(&self.metrics),
            group_commit: self.group_commit.clone(),
            shadow: self.shadow.clone(),
            guard: self.guard.clone(),
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
            shadow: None,
            guard: None,
        }
    }

    /// The same, telling `guard` how each read went.
    pub fn with_guard(mut self, guard: Guard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Tells the guard, if any, how a read of `source` went; hands the result on.
    fn watched<T>(
        &self,
        source: crate::domain::StorageSource,
        started: Instant,
        result: Result<T, crate::storage::StorageError>,
    ) -> Result<T, crate::storage::StorageError> {
        if let Some(guard) = &self.guard {
            guard.read(source, started.elapsed(), result.is_err());
        }
        result
    }

    /// The same, shadowing a sample of reads on the other storage.
    pub fn with_shadow(mut self, shadow: Shadow) -> Self {
        self.shadow = Some(shadow);
        self
    }

    /// Stores one validated event, in one transaction with other callers' single events
    /// (see [`GroupCommit`]); answers whether it was a duplicate.
    pub async fn record_one(&self, event: Event) -> Result<bool, AppError> {
        self.group_commit
            .record(event)
            .await
            .map_err(AppError::from)
    }

    /// Stores validated events atomically (all or none), through the same queue as single
    /// events: a batch may share its transaction with other callers' events.
    pub async fn record(&self, events: Vec<Event>) -> Result<RecordOutcome, AppError> {
        let duplicates = self.group_commit.record_all(events).await?;
        Ok(RecordOutcome::of(&duplicates))
    }

    /// Stores a stream of validated events in chunks of [`STREAM_CHUNK_EVENTS`], each
    /// atomic, reading the next chunk while the last one is written. Stops at the first
    /// failure, of the source or of a write; what was stored before it stays stored.
    pub async fn record_stream<E>(
        &self,
        events: impl Stream<Item = Result<Event, E>> + Send,
    ) -> StreamRecorded<E> {
        // Reading never waits for the database unless chunks queue up: a transport's unread
        // frames pile up in its buffers otherwise (h2 closes the whole connection, GOAWAY
        // ENHANCE_YOUR_CALM "too_many_data_frames", once too many small ones wait there).
        let (chunks, mut queued) = tokio::sync::mpsc::channel::<Vec<Event>>(QUEUED_CHUNKS);
        let read = async move {
            let mut events = std::pin::pin!(events);
            let mut chunk = Vec::with_capacity(STREAM_CHUNK_EVENTS);
            while let Some(event) = events.next().await {
                chunk.push(event?);
                if chunk.len() == STREAM_CHUNK_EVENTS {
                    let full =
                        std::mem::replace(&mut chunk, Vec::with_capacity(STREAM_CHUNK_EVENTS));
                    if chunks.send(full).await.is_err() {
                        return Ok(()); // the writer failed, and says why
                    }
                }
            }
            if !chunk.is_empty() {
                let _ = chunks.send(chunk).await;
            }
            Ok(())
        };
        let write = async {
            let mut stored = RecordOutcome::default();
            // Position in the stream of the chunk's first event.
            let mut chunk_start = 0;
            while let Some(chunk) = queued.recv().await {
                let len = chunk.len();
                match self.record(chunk).await {
                    Ok(outcome) => stored += outcome,
                    Err(error) => return (stored, Some(error.shifted(chunk_start))),
                }
                chunk_start += len;
            }
            (stored, None)
        };
        let (read, (stored, write_error)) = tokio::join!(read, write);
        // A failed write comes first: its chunk precedes anything read after it.
        let failure = match (write_error, read) {
            (Some(error), _) => Some(StreamFailure::Write(error)),
            (None, Err(error)) => Some(StreamFailure::Source(error)),
            (None, Ok(())) => None,
        };
        StreamRecorded { stored, failure }
    }

    /// Totals of each requested campaign, in request order; zeros for a campaign without
    /// events in the range, unknown, or owned by another user.
    pub async fn campaign_stats(
        &self,
        query: &CampaignStatsQuery,
    ) -> Result<Answer<Vec<(CampaignId, EventTotals)>>, AppError> {
        let source = self.rollout.read_source(query.user.as_str());
        let started = Instant::now();
        let totals = self
            .store
            .campaign_totals(source, &query.user, &query.campaigns, query.range)
            .await;
        let totals = self.watched(source, started, totals)?;
        self.metrics
            .observe_read(CAMPAIGN_TOTALS, source, started.elapsed());
        if let Some(shadow) = &self.shadow {
            shadow.offer(source, || ShadowRead::Campaigns {
                user: query.user.clone(),
                campaigns: query.campaigns.clone(),
                range: query.range,
                primary: totals.clone(),
            });
        }
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
    ) -> Result<Answer<Vec<(NaiveDate, EventTotals)>>, AppError> {
        let user = query.scope.user.as_ref().map_or(ALL_USERS, UserId::as_str);
        let source = self.rollout.read_source(user);
        let started = Instant::now();
        let daily = self
            .store
            .daily_totals(source, &query.scope, query.range)
            .await;
        let daily = self.watched(source, started, daily)?;
        self.metrics
            .observe_read(DAILY_TOTALS, source, started.elapsed());
        if let Some(shadow) = &self.shadow {
            shadow.offer(source, || ShadowRead::Daily {
                scope: query.scope.clone(),
                range: query.range,
                primary: daily.clone(),
            });
        }
        Ok(Answer {
            value: bucket_series(daily, query.range, query.granularity, query.fill_empty)?,
            source,
        })
    }
}
