//! `stats.v1.StatsService`: validate, call the use case, shape the answer.

use std::time::Duration;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use super::auth::may_read_all_users;
use super::convert::{bucket_to_proto, event_from_request, events_from_proto};
use super::error::{status_of, write_status};
use super::proto::stats_service_server::StatsService;
use super::proto::{
    GetAggregatedDailyStatsRequest, GetAggregatedDailyStatsResponse, GetStatsForCampaignsRequest,
    GetStatsForCampaignsResponse, GetStatsRequest, GetStatsResponse, RecordEventRequest,
    RecordEventResponse, RecordEventsRequest, RecordEventsResponse,
};
use crate::app::{AppError, Stats, StreamFailure};
use crate::domain::{
    CampaignStatsQuery, LimitExceeded, MAX_BATCH_EVENTS, SeriesQuery, StorageSource,
    ValidationError,
};
use crate::storage::{RecordOutcome, Store};
use futures::StreamExt;

/// Trailer of a failed `StreamEvents` call: how many events of the stream were stored.
pub const STORED_COUNT_METADATA: &str = "x-stored-count";

/// Why a `StreamEvents` message could not be taken.
enum BadMessage {
    /// The event broke a rule.
    Invalid(ValidationError),
    /// The stream itself failed (the client went away, a transport error).
    Transport(Status),
    /// No message came for this long.
    Idle(Duration),
}

/// The `StatsService` handlers.
#[derive(Debug)]
pub struct StatsApi<S> {
    stats: Stats<S>,
    stream_idle_timeout: Duration,
}

impl<S: Store> StatsApi<S> {
    /// The handlers over `stats`; an ingest stream silent for `stream_idle_timeout` is closed.
    pub fn new(stats: Stats<S>, stream_idle_timeout: Duration) -> Self {
        Self {
            stats,
            stream_idle_timeout,
        }
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
        let duplicate = (self.stats.record_one(event).await)
            .map_err(|error| write_status(error, |_| "event".to_owned()))?;
        Ok(Response::new(RecordEventResponse { duplicate }))
    }

    async fn record_events(
        &self,
        request: Request<RecordEventsRequest>,
    ) -> Result<Response<RecordEventsResponse>, Status> {
        let events = request.into_inner().events;
        LimitExceeded::check("events", MAX_BATCH_EVENTS, events.len())?;
        let events = events_from_proto(events)?;
        let outcome = self.stats.record(events).await?;
        Ok(Response::new(record_response(outcome)))
    }

    async fn stream_events(
        &self,
        request: Request<Streaming<RecordEventRequest>>,
    ) -> Result<Response<RecordEventsResponse>, Status> {
        let idle = self.stream_idle_timeout;
        let events = tokio_stream::StreamExt::timeout(request.into_inner(), idle)
            .enumerate()
            .map(move |(position, message)| match message {
                Ok(Ok(request)) => event_from_request(request, &format!("events[{position}]"))
                    .map_err(BadMessage::Invalid),
                Ok(Err(status)) => Err(BadMessage::Transport(status)),
                Err(_elapsed) => Err(BadMessage::Idle(idle)),
            });
        let recorded = self.stats.record_stream(events).await;
        // Failures name the event's position in the whole stream and say how much of the
        // stream was stored, so that a producer knows where to resume.
        let stored = recorded.stored;
        let trailers = || {
            let mut trailers = MetadataMap::new();
            trailers.insert(
                STORED_COUNT_METADATA,
                MetadataValue::from(stored.stored + stored.duplicates),
            );
            trailers
        };
        let fail = |error: AppError| Err(status_of(error, |i| format!("events[{i}]"), trailers()));
        match recorded.failure {
            None => Ok(Response::new(record_response(stored))),
            Some(StreamFailure::Write(error)) => fail(error),
            Some(StreamFailure::Source(BadMessage::Invalid(error))) => fail(error.into()),
            Some(StreamFailure::Source(BadMessage::Transport(status))) => Err(status),
            // The events of the chunk being read are not stored: the trailer says how many
            // were, and a retry with idempotency keys counts each once.
            Some(StreamFailure::Source(BadMessage::Idle(idle))) => Err(Status::with_metadata(
                Code::DeadlineExceeded,
                format!("no message for {idle:?}: the stream is closed"),
                trailers(),
            )),
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
        if request.get_ref().user_id.is_empty() {
            may_read_all_users(&request)?;
        }
        let query = SeriesQuery::try_from(request.into_inner())?;
        let answer = self.stats.series(&query).await?;
        let response = GetAggregatedDailyStatsResponse {
            buckets: answer.value.into_iter().map(bucket_to_proto).collect(),
            source: super::proto::StorageSource::from(answer.source).into(),
        };
        Ok(answered(response, answer.source))
    }
}
