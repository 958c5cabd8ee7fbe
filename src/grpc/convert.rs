//! Conversions between protos and domain types. Requests become validated domain values
//! here (`TryFrom`), so handlers never see an unchecked field.

use chrono::{DateTime, NaiveDate, Utc};

use super::proto;
use crate::app::AppError;
use crate::domain::{
    self, CampaignId, CampaignStatsQuery, DateRange, Event, EventTotals, EventType, FieldViolation,
    Granularity, LimitExceeded, MAX_CAMPAIGNS_PER_READ, RawEvent, Scope, SeriesQuery, UserId,
    ValidationError, parse_actor, parse_reason,
};

impl From<proto::EventType> for Option<EventType> {
    /// The API's values are the stored codes of [`crate::domain::EVENT_TYPES`].
    fn from(value: proto::EventType) -> Self {
        i16::try_from(i32::from(value))
            .ok()
            .and_then(EventType::from_code)
    }
}

impl TryFrom<proto::Event> for Event {
    type Error = ValidationError;

    fn try_from(event: proto::Event) -> Result<Self, Self::Error> {
        let event_type = proto::EventType::try_from(event.event_type)
            .ok()
            .and_then(Option::<EventType>::from);
        let (occurred_at, bad_timestamp) = match event.occurred_at {
            None => (None, None),
            Some(ts) => match u32::try_from(ts.nanos)
                .ok()
                .and_then(|nanos| DateTime::<Utc>::from_timestamp(ts.seconds, nanos))
            {
                Some(at) => (Some(at), None),
                None => (
                    None,
                    Some(FieldViolation::new(
                        "occurred_at",
                        "is not a valid timestamp",
                    )),
                ),
            },
        };
        let raw = RawEvent {
            user_id: event.user_id,
            campaign_id: event.campaign_id,
            event_type,
            count: event.count,
            occurred_at,
            email_account_id: event.email_account_id,
            idempotency_key: event.idempotency_key,
        };
        let validated = Event::validate(raw, Utc::now());
        match (validated, bad_timestamp) {
            (validated, None) => validated,
            (Ok(_), Some(bad)) => Err(ValidationError::from_failures([Some(bad)])),
            (Err(mut error), Some(bad)) => {
                error.violations.push(bad);
                Err(error)
            }
        }
    }
}

/// Validates a batch as a whole: every bad event is named (`events[i].field`), and any
/// violation rejects the batch.
pub fn events_from_proto(events: Vec<proto::Event>) -> Result<Vec<Event>, ValidationError> {
    let mut valid = Vec::with_capacity(events.len());
    let mut violations = Vec::new();
    for (index, event) in events.into_iter().enumerate() {
        match Event::try_from(event) {
            Ok(event) => valid.push(event),
            Err(error) => violations.extend(error.within(&format!("events[{index}]")).violations),
        }
    }
    if violations.is_empty() {
        Ok(valid)
    } else {
        Err(ValidationError { violations })
    }
}

/// The event of a `RecordEventRequest`, validated; `path` names it in errors.
pub fn event_from_request(
    request: proto::RecordEventRequest,
    path: &str,
) -> Result<Event, ValidationError> {
    let event = request
        .event
        .ok_or_else(|| ValidationError::single(path, "is required"))?;
    Event::try_from(event).map_err(|e| e.within(path))
}

fn campaign_ids(ids: Vec<String>) -> Result<Vec<CampaignId>, Vec<FieldViolation>> {
    let mut valid = Vec::with_capacity(ids.len());
    let mut violations = Vec::new();
    for (index, id) in ids.into_iter().enumerate() {
        match CampaignId::parse(&format!("campaign_ids[{index}]"), id) {
            Ok(id) => valid.push(id),
            Err(violation) => violations.push(violation),
        }
    }
    if violations.is_empty() {
        Ok(valid)
    } else {
        Err(violations)
    }
}

/// Merges the outcome of a request's field checks: the values when all passed, else every
/// violation.
fn all_valid<A, B, C>(
    a: Result<A, ValidationError>,
    b: Result<B, ValidationError>,
    c: Result<C, ValidationError>,
) -> Result<(A, B, C), ValidationError> {
    match (a, b, c) {
        (Ok(a), Ok(b), Ok(c)) => Ok((a, b, c)),
        (a, b, c) => Err(ValidationError {
            violations: [a.err(), b.err(), c.err()]
                .into_iter()
                .flatten()
                .flat_map(|e| e.violations)
                .collect(),
        }),
    }
}

/// Merges the checks of two fields into one error naming every bad field.
pub(super) fn both_valid<A, B>(
    a: Result<A, ValidationError>,
    b: Result<B, ValidationError>,
) -> Result<(A, B), ValidationError> {
    all_valid(a, b, Ok(())).map(|(a, b, ())| (a, b))
}

/// The actor (`unknown` when empty) and the required reason of an audited change; `why`
/// says what the reason must explain.
pub(super) fn audit(
    actor: String,
    reason: String,
    why: &str,
) -> Result<(String, String), ValidationError> {
    both_valid(
        parse_actor(actor).map_err(|v| ValidationError::from_failures([Some(v)])),
        parse_reason(reason, why).map_err(|v| ValidationError::from_failures([Some(v)])),
    )
}

fn user(field: &str, id: String) -> Result<UserId, ValidationError> {
    UserId::parse(field, id).map_err(|v| ValidationError::from_failures([Some(v)]))
}

/// A read names at most [`MAX_CAMPAIGNS_PER_READ`] campaigns; checked before any id is
/// validated, so an oversized list costs nothing more.
fn within_read_limit(campaign_ids: &[String]) -> Result<(), LimitExceeded> {
    LimitExceeded::check("campaign_ids", MAX_CAMPAIGNS_PER_READ, campaign_ids.len())
}

fn campaigns(ids: Vec<String>) -> Result<Vec<CampaignId>, ValidationError> {
    campaign_ids(ids).map_err(|violations| ValidationError { violations })
}

impl TryFrom<proto::GetStatsRequest> for CampaignStatsQuery {
    type Error = AppError;

    fn try_from(request: proto::GetStatsRequest) -> Result<Self, Self::Error> {
        let campaign = CampaignId::parse("campaign_id", request.campaign_id)
            .map_err(|v| ValidationError::from_failures([Some(v)]));
        let (user, campaign, range) = all_valid(
            user("user_id", request.user_id),
            campaign,
            DateRange::parse(&request.start_date, &request.end_date),
        )?;
        Ok(CampaignStatsQuery {
            user,
            campaigns: vec![campaign],
            range,
        })
    }
}

impl TryFrom<proto::GetStatsForCampaignsRequest> for CampaignStatsQuery {
    type Error = AppError;

    fn try_from(request: proto::GetStatsForCampaignsRequest) -> Result<Self, Self::Error> {
        within_read_limit(&request.campaign_ids)?;
        let (user, campaigns, range) = all_valid(
            user("user_id", request.user_id),
            campaigns(request.campaign_ids),
            DateRange::parse(&request.start_date, &request.end_date),
        )?;
        Ok(CampaignStatsQuery {
            user,
            campaigns,
            range,
        })
    }
}

impl TryFrom<proto::GetAggregatedDailyStatsRequest> for SeriesQuery {
    type Error = AppError;

    fn try_from(request: proto::GetAggregatedDailyStatsRequest) -> Result<Self, Self::Error> {
        within_read_limit(&request.campaign_ids)?;
        // An empty user id is the operator's all-users view.
        let user = if request.user_id.is_empty() {
            Ok(None)
        } else {
            user("user_id", request.user_id).map(Some)
        };
        let granularity = match proto::Granularity::try_from(request.granularity) {
            Ok(proto::Granularity::Unspecified | proto::Granularity::Day) => Ok(Granularity::Day),
            Ok(proto::Granularity::Week) => Ok(Granularity::Week),
            Ok(proto::Granularity::Month) => Ok(Granularity::Month),
            Err(_) => Err(ValidationError::single(
                "granularity",
                format!("unknown value {}", request.granularity),
            )),
        };
        let scope = all_valid(user, campaigns(request.campaign_ids), Ok(()))
            .map(|(user, campaigns, ())| Scope { user, campaigns });
        let (scope, range, granularity) = all_valid(
            scope,
            DateRange::parse(&request.start_date, &request.end_date),
            granularity,
        )?;
        Ok(SeriesQuery {
            scope,
            range,
            granularity,
            fill_empty: request.fill_empty,
        })
    }
}

impl From<domain::StorageSource> for proto::StorageSource {
    fn from(source: domain::StorageSource) -> Self {
        match source {
            domain::StorageSource::Legacy => proto::StorageSource::Legacy,
            domain::StorageSource::New => proto::StorageSource::New,
        }
    }
}

impl From<EventTotals> for proto::Metrics {
    fn from(m: EventTotals) -> Self {
        proto::Metrics {
            sent: m.sent,
            opened: m.opened,
            clicked: m.clicked,
            replied: m.replied,
            positive_replies: m.positive_replies,
            bounced: m.bounced,
        }
    }
}

/// A bucket of a series as the API shows it.
pub fn bucket_to_proto((start, metrics): (NaiveDate, EventTotals)) -> proto::Bucket {
    proto::Bucket {
        bucket_start: start.to_string(),
        metrics: Some(metrics.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_event_type_is_one_of_the_table() {
        let api: Vec<(&str, Option<EventType>)> = (0..=6)
            .map(|value| {
                let api = proto::EventType::try_from(value).expect("a value of the proto");
                (api.as_str_name(), api.into())
            })
            .collect();
        assert_eq!(api[0], ("EVENT_TYPE_UNSPECIFIED", None));
        for (name, event_type) in &api[1..] {
            let event_type = event_type.expect("a known type");
            assert_eq!(name["EVENT_TYPE_".len()..], *event_type.names().api_name);
        }
        assert!(
            proto::EventType::try_from(7).is_err(),
            "a type the table lacks"
        );
    }
}
