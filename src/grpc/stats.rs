//! `stats.v1.StatsService`: validate, call the use case, shape the answer.

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

use super::convert::{bucket_to_proto, event_from_request, events_from_proto};
use super::error::ingest_status;
use super::proto::stats_service_server::StatsService;
use super::proto::{
    GetAggregatedDailyStatsRequest, GetAggregatedDailyStatsResponse, GetStatsForCampaignsRequest,
    GetStatsForCampaignsResponse, GetStatsRequest, GetStatsResponse, RecordEventRequest,
    RecordEventResponse, RecordEventsRequest, RecordEventsResponse,
};
use super::{ApiError, STREAM_CHUNK_EVENTS};
use crate::app::Stats;
use crate::domain::{
    CampaignStatsQuery, Event, LimitExceeded, MAX_BATCH_EVENTS, SeriesQuery, StorageSource,
};
use crate::storage::{RecordOutcome, Store};

/// Trailer of a failed `StreamEvents` call: how many events of the stream were stored.
pub const STORED_COUNT_METADATA: &str = "x-stored-count";

/// Full chunks of a stream that may wait for the committer while the next is read: with the
/// chunk being committed and the one being read, at most three chunks per stream are held.
const QUEUED_CHUNKS: usize = 1;

/// Why reading a `StreamEvents` stream stopped early.
enum StreamFailure {
    /// An event broke a rule.
    Invalid(ApiError),
    /// The stream itself failed (the client went away, a transport error).
    Transport(Status),
}

impl From<Status> for StreamFailure {
    fn from(status: Status) -> Self {
        StreamFailure::Transport(status)
    }
}

/// The `StatsService` handlers.
#[derive(Debug)]
pub struct StatsApi<S> {
    stats: Stats<S>,
}

impl<S: Store> StatsApi<S> {
    pub fn new(stats: Stats<S>) -> Self {
        Self { stats }
    }
}

/// A read's response, carrying (as an extension, for the tower layers' metrics) the storage
/// that answered.
fn answered<T>(message: T, source: StorageSource) -> Response<T> {
    let mut response = Response::new(message);
    response.extensions_mut().insert(source);
    response
}

fn record_response(outcome: RecordOutcome) -> RecordEventsResponse {
    RecordEventsResponse {
        stored: outcome.stored,
        duplicates: outcome.duplicates,
    }
}

#[tonic::async_trait]
impl<S: Store> StatsService for StatsApi<S> {
    async fn record_event(
        &self,
        request: Request<RecordEventRequest>,
    ) -> Result<Response<RecordEventResponse>, Status> {
        let event = event_from_request(request.into_inner(), "event")?;
        let duplicate = self.stats.record_one(event).await.map_err(ingest_status)?;
        Ok(Response::new(RecordEventResponse { duplicate }))
    }

    async fn record_events(
        &self,
        request: Request<RecordEventsRequest>,
    ) -> Result<Response<RecordEventsResponse>, Status> {
        let events = request.into_inner().events;
        LimitExceeded::check("events", MAX_BATCH_EVENTS, events.len())?;
        let events = events_from_proto(events)?;
        let outcome = self
            .stats
            .record(events)
            .await
            .map_err(|e| ApiError::from_ingest(e, |i| format!("events[{i}]")))?;
        Ok(Response::new(record_response(outcome)))
    }

    async fn stream_events(
        &self,
        request: Request<Streaming<RecordEventRequest>>,
    ) -> Result<Response<RecordEventsResponse>, Status> {
        let mut stream = request.into_inner();
        // Full chunks go to the committer below while the next one is read: reading never
        // waits for the database unless chunks queue up. Frames a handler leaves unread pile
        // up in HTTP/2's buffers, and h2 closes the whole connection (GOAWAY
        // ENHANCE_YOUR_CALM "too_many_data_frames") once too many small ones wait there.
        let (chunks, mut queued) = tokio::sync::mpsc::channel::<Vec<Event>>(QUEUED_CHUNKS);
        let read = async move {
            let mut position = 0;
            let mut chunk = Vec::with_capacity(STREAM_CHUNK_EVENTS);
            loop {
                let Some(request) = stream.message().await? else {
                    if !chunk.is_empty() {
                        let _ = chunks.send(chunk).await;
                    }
                    return Ok(());
                };
                let event = event_from_request(request, &format!("events[{position}]"))
                    .map_err(ApiError::from);
                chunk.push(event.map_err(StreamFailure::Invalid)?);
                position += 1;
                if chunk.len() == STREAM_CHUNK_EVENTS {
                    let full =
                        std::mem::replace(&mut chunk, Vec::with_capacity(STREAM_CHUNK_EVENTS));
                    if chunks.send(full).await.is_err() {
                        return Ok(()); // the committer failed, and says why
                    }
                }
            }
        };
        let commit = async {
            let mut stored = RecordOutcome::default();
            // Position in the stream of the chunk's first event.
            let mut chunk_start = 0;
            while let Some(chunk) = queued.recv().await {
                let len = chunk.len();
                match self.stats.record(chunk).await {
                    Ok(outcome) => stored += outcome,
                    Err(error) => {
                        let at = chunk_start;
                        let error = ApiError::from_ingest(error, |i| format!("events[{}]", at + i));
                        return (stored, Some(error));
                    }
                }
                chunk_start += len;
            }
            (stored, None)
        };
        let (read, (stored, commit_error)): (Result<(), StreamFailure>, _) =
            tokio::join!(read, commit);
        // Failures name the event's position in the whole stream and say how much of the
        // stream was stored, so that a producer knows where to resume. A failed commit comes
        // first: its chunk precedes anything read after it.
        let fail = |error: ApiError| {
            let mut trailers = MetadataMap::new();
            trailers.insert(
                STORED_COUNT_METADATA,
                MetadataValue::from(stored.stored + stored.duplicates),
            );
            error.into_status_with(trailers)
        };
        match (commit_error, read) {
            (Some(error), _) | (None, Err(StreamFailure::Invalid(error))) => Err(fail(error)),
            (None, Err(StreamFailure::Transport(status))) => Err(status),
            (None, Ok(())) => Ok(Response::new(record_response(stored))),
        }
    }

    async fn get_stats(
        &self,
        request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let query = CampaignStatsQuery::try_from(request.into_inner())?;
        let answer = self.stats.campaign_stats(&query).await?;
        let source = answer.source;
        let response = answer
            .value
            .into_iter()
            .next()
            .map(|(campaign, metrics)| GetStatsResponse {
                campaign_id: campaign.into_string(),
                metrics: Some(metrics.into()),
                source: super::proto::StorageSource::from(source).into(),
            })
            .ok_or_else(|| Status::internal("no answer for the campaign"))?;
        Ok(answered(response, source))
    }

    async fn get_stats_for_campaigns(
        &self,
        request: Request<GetStatsForCampaignsRequest>,
    ) -> Result<Response<GetStatsForCampaignsResponse>, Status> {
        let query = CampaignStatsQuery::try_from(request.into_inner())?;
        let answer = self.stats.campaign_stats(&query).await?;
        let source: i32 = super::proto::StorageSource::from(answer.source).into();
        let response = GetStatsForCampaignsResponse {
            stats: answer
                .value
                .into_iter()
                .map(|(campaign, metrics)| GetStatsResponse {
                    campaign_id: campaign.into_string(),
                    metrics: Some(metrics.into()),
                    source,
                })
                .collect(),
            source,
        };
        Ok(answered(response, answer.source))
    }

    async fn get_aggregated_daily_stats(
        &self,
        request: Request<GetAggregatedDailyStatsRequest>,
    ) -> Result<Response<GetAggregatedDailyStatsResponse>, Status> {
        let query = SeriesQuery::try_from(request.into_inner())?;
        let answer = self.stats.series(&query).await?;
        let response = GetAggregatedDailyStatsResponse {
            buckets: answer.value.into_iter().map(bucket_to_proto).collect(),
            source: super::proto::StorageSource::from(answer.source).into(),
        };
        Ok(answered(response, answer.source))
    }
}
