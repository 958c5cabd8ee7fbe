//! The one mapping from every error a handler can meet to a `tonic::Status`.
//!
//! Clients get a short message and, for bad input, a `google.rpc.BadRequest` detail naming
//! the fields; internal details go to the log only.
//!
//! Both travel in response headers (`grpc-message`, `grpc-status-details-bin`), which many
//! clients cap: grpcio (Python, C++, Ruby) drops a status whose metadata passes 16 KiB and
//! reports `RESOURCE_EXHAUSTED` instead. So a status stays under [`MAX_STATUS_BYTES`] however
//! large or bad the request: at most [`MAX_VIOLATIONS_LISTED`] violations are listed (the
//! message counts the rest), every text is cut, and echoed input is quoted by
//! [`crate::domain::echo`].

use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::app::AppError;
use crate::domain::{CampaignId, FieldViolation, LimitExceeded, ValidationError, echo};
use crate::rollout::RolloutRefused;
use crate::storage::{LEGACY_COLUMN_MAX, LegacyOverflow};

/// Most bytes of `grpc-message` and `grpc-status-details-bin` together, as sent.
pub const MAX_STATUS_BYTES: usize = 8 * 1024;
/// Most violations listed in the `BadRequest` detail; the message counts the rest.
pub const MAX_VIOLATIONS_LISTED: usize = 50;
/// Most violations named in the message itself.
const MAX_VIOLATIONS_IN_MESSAGE: usize = 10;
/// Longest message, in bytes. Sent percent-encoded (up to 3 bytes per byte) and again inside
/// the details (base64, 4 per 3).
const MAX_MESSAGE_BYTES: usize = 512;
/// Most bytes of the listed violations' fields and descriptions together (sent base64).
const MAX_DETAILS_BYTES: usize = 3_400;
/// Longest field path and description of one violation, in bytes.
const MAX_FIELD_BYTES: usize = 96;
const MAX_DESCRIPTION_BYTES: usize = 160;

/// How long a caller should wait before retrying a call the storage could not take: about
/// one health-check interval, within which a database that returns is found again.
pub const STORAGE_PUSHBACK: Duration = Duration::from_secs(1);
/// … a write the replica's queue had no room for, or a call past the replica's call limit.
pub const QUEUE_PUSHBACK: Duration = Duration::from_millis(100);
/// … a call a replica that is shutting down turned away (the next one goes elsewhere).
pub const SHUTDOWN_PUSHBACK: Duration = Duration::from_millis(100);

/// A status a caller should retry after `after`: said twice, as gRPC's own retry policy reads
/// it (`grpc-retry-pushback-ms` metadata) and as applications read it (a `google.rpc.RetryInfo`
/// detail).
pub fn retry_later(
    code: Code,
    message: String,
    mut metadata: MetadataMap,
    after: Duration,
) -> Status {
    let millis = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    metadata.insert("grpc-retry-pushback-ms", millis.into());
    let details = ErrorDetails::with_retry_info(Some(after));
    Status::with_error_details_and_metadata(code, message, details, metadata)
}

/// The status for `error`, naming the event at position `i` of the caller's events as
/// `event_path(i)`, with `metadata` attached: the one mapping from what a use case refused to
/// what the client sees.
pub fn status_of(
    error: AppError,
    event_path: impl Fn(usize) -> String,
    metadata: MetadataMap,
) -> Status {
    // One long match on purpose: it is exhaustive, so a new `AppError` variant does not
    // compile until it has a status here, and every code a client can see reads in one place.
    let (code, message, violations) = match error {
        AppError::Invalid(error) => (Code::InvalidArgument, "invalid request", error.violations),
        AppError::LimitExceeded(limit) => (
            Code::ResourceExhausted,
            "request over limits",
            vec![FieldViolation::new(
                limit.field,
                format!(
                    "at most {} items are allowed, got {}",
                    limit.limit, limit.actual
                ),
            )],
        ),
        AppError::NotOwner(foreign) => (
            Code::PermissionDenied,
            "permission denied",
            not_owner_violations(foreign, &event_path),
        ),
        AppError::LegacyOverflow(overflows) => (
            Code::OutOfRange,
            "a count would pass what the legacy table holds; nothing was stored",
            overflow_violations(overflows, &event_path),
        ),
        AppError::TotalOutOfRange(detail) => {
            tracing::warn!(%detail, "a total is out of range");
            return plain(
                Code::OutOfRange,
                "a total is out of range: it passes 64 bits (18446744073709551615)".to_owned(),
                metadata,
            );
        }
        AppError::TransitionRefused(refused) => {
            return plain(Code::FailedPrecondition, refused.to_string(), metadata);
        }
        AppError::ResolveRefused(refused) => {
            return plain(Code::FailedPrecondition, refused.to_string(), metadata);
        }
        AppError::StartRefused(refused) => {
            return plain(Code::FailedPrecondition, refused.to_string(), metadata);
        }
        AppError::RolloutRefused(refused) => {
            let code = match refused {
                RolloutRefused::VersionConflict { .. } => Code::Aborted,
                RolloutRefused::NoOverride(_) => Code::NotFound,
                RolloutRefused::NotVerified(_)
                | RolloutRefused::LegacyRetired
                | RolloutRefused::GuardTripped(_)
                | RolloutRefused::AlreadyOverridden(_)
                | RolloutRefused::Schedule(_) => Code::FailedPrecondition,
            };
            return plain(code, refused.to_string(), metadata);
        }
        AppError::RepairRefused(message) => {
            return plain(Code::FailedPrecondition, message, metadata);
        }
        AppError::NotFound(message) => return plain(Code::NotFound, message, metadata),
        AppError::QueueFull(events) => {
            let message = format!(
                "too many writes are queued on this replica ({events} events); retry later"
            );
            return retry_later(Code::ResourceExhausted, message, metadata, QUEUE_PUSHBACK);
        }
        AppError::ShuttingDown => {
            let message = "the server is shutting down; retry on another replica".to_owned();
            return retry_later(Code::Unavailable, message, metadata, SHUTDOWN_PUSHBACK);
        }
        AppError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "storage unavailable");
            let message = "storage is unavailable, retry later".to_owned();
            return retry_later(Code::Unavailable, message, metadata, STORAGE_PUSHBACK);
        }
        AppError::Internal(detail) => {
            tracing::error!(error = %detail, "internal failure");
            return plain(Code::Internal, "internal error".to_owned(), metadata);
        }
    };
    let violations: Vec<FieldViolation> = violations
        .into_iter()
        .map(|v| FieldViolation {
            field: cut(v.field, MAX_FIELD_BYTES),
            description: cut(v.description, MAX_DESCRIPTION_BYTES),
        })
        .collect();
    let listed = listed_in_details(&violations);
    let message = describe(message, &violations, listed);
    let details = ErrorDetails::with_bad_request(
        violations
            .into_iter()
            .take(listed)
            .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details_and_metadata(code, message, details, metadata)
}

/// The status of a write that was not acknowledged, naming the event at position `i` of the
/// caller's events as `event_path(i)`.
pub fn write_status(error: AppError, event_path: impl Fn(usize) -> String) -> Status {
    status_of(error, event_path, MetadataMap::new())
}

/// One violation per event naming another user's campaign.
fn not_owner_violations(
    foreign: Vec<(usize, CampaignId)>,
    event_path: &impl Fn(usize) -> String,
) -> Vec<FieldViolation> {
    foreign
        .into_iter()
        .map(|(index, campaign)| {
            FieldViolation::new(
                format!("{}.campaign_id", event_path(index)),
                format!(
                    "campaign {} belongs to another user",
                    echo(campaign.as_str())
                ),
            )
        })
        .collect()
}

/// One violation per event adding to a legacy count that would overflow.
fn overflow_violations(
    overflows: Vec<LegacyOverflow>,
    event_path: &impl Fn(usize) -> String,
) -> Vec<FieldViolation> {
    overflows
        .into_iter()
        .flat_map(|overflow| {
            let description = format!(
                "would take the legacy {} count of campaign {} on {} past {} \
                 (the legacy column is an int; it holds {})",
                overflow.event_type.legacy_column(),
                echo(&overflow.campaign_id),
                overflow.day,
                LEGACY_COLUMN_MAX,
                overflow.current
            );
            overflow.events.into_iter().map(move |index| {
                FieldViolation::new(format!("{}.count", event_path(index)), description.clone())
            })
        })
        .collect()
}

impl From<AppError> for Status {
    /// Events of a batch are named `events[i]`.
    fn from(error: AppError) -> Self {
        status_of(error, |i| format!("events[{i}]"), MetadataMap::new())
    }
}

impl From<ValidationError> for Status {
    fn from(error: ValidationError) -> Self {
        AppError::from(error).into()
    }
}

impl From<LimitExceeded> for Status {
    fn from(error: LimitExceeded) -> Self {
        AppError::from(error).into()
    }
}

/// The bytes `status` takes in the response headers it travels in (`grpc-message` and
/// `grpc-status-details-bin`), encoded as sent: what [`MAX_STATUS_BYTES`] bounds.
pub fn status_header_bytes(status: &Status) -> usize {
    let mut headers = http::HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        return usize::MAX;
    }
    ["grpc-message", "grpc-status-details-bin"]
        .iter()
        .filter_map(|name| headers.get(*name))
        .map(|value| value.len())
        .sum()
}

/// A status without details; its message cut to [`MAX_MESSAGE_BYTES`].
fn plain(code: Code, message: String, metadata: MetadataMap) -> Status {
    let mut status = Status::new(code, cut(message, MAX_MESSAGE_BYTES));
    *status.metadata_mut() = metadata;
    status
}

/// `text`, cut to at most `max` bytes on a character boundary (ending in `…` when cut).
fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

/// How many of `violations` (already cut) the `BadRequest` detail lists: at most
/// [`MAX_VIOLATIONS_LISTED`], and no more than fit [`MAX_DETAILS_BYTES`].
fn listed_in_details(violations: &[FieldViolation]) -> usize {
    let mut bytes = 0;
    violations
        .iter()
        .take(MAX_VIOLATIONS_LISTED)
        .take_while(|v| {
            // Each violation also costs a few bytes of protobuf framing.
            bytes += v.field.len() + v.description.len() + 8;
            bytes <= MAX_DETAILS_BYTES
        })
        .count()
}

/// `message: field: reason; field: reason (and N more; M of T listed in the details)`:
/// violations are named while they fit [`MAX_MESSAGE_BYTES`], and the count always fits.
fn describe(message: &str, violations: &[FieldViolation], listed: usize) -> String {
    // Room kept for the count at the end.
    const COUNT_BYTES: usize = 64;
    let mut text = cut(message.to_owned(), MAX_MESSAGE_BYTES - COUNT_BYTES);
    let mut named = 0;
    for violation in violations.iter().take(MAX_VIOLATIONS_IN_MESSAGE) {
        let part = format!("{}{violation}", if named == 0 { ": " } else { "; " });
        if text.len() + part.len() > MAX_MESSAGE_BYTES - COUNT_BYTES {
            break;
        }
        text.push_str(&part);
        named += 1;
    }
    if violations.len() > named {
        let more = violations.len() - named;
        text.push_str(&format!(
            " (and {more} more; {listed} of {} listed in the details)",
            violations.len()
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hundreds_of_violations_stay_small_and_are_counted() {
        let violations = (0..400)
            .map(|i| {
                FieldViolation::new(
                    format!("events[{i}].occurred_at"),
                    "must lie between 2000-01-01T00:00:00+00:00 and 2026-11-23T12:00:00+00:00, \
                     got 1999-12-31T23:59:59+00:00",
                )
            })
            .collect();
        let status = Status::from(AppError::Invalid(ValidationError { violations }));
        assert!(
            status_header_bytes(&status) < MAX_STATUS_BYTES,
            "{}",
            status_header_bytes(&status)
        );
        let listed = status
            .get_details_bad_request()
            .expect("details")
            .field_violations;
        assert!(!listed.is_empty() && listed.len() <= MAX_VIOLATIONS_LISTED);
        assert_eq!(listed[0].field, "events[0].occurred_at");
        assert!(
            status.message().contains("of 400 listed"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn huge_texts_are_cut_even_when_not_echoed_by_the_rules() {
        let huge = "é".repeat(600_000);
        let status = Status::from(AppError::Invalid(ValidationError::single(
            huge.clone(),
            huge.clone(),
        )));
        assert!(
            status_header_bytes(&status) < MAX_STATUS_BYTES,
            "{}",
            status_header_bytes(&status)
        );
        let status = Status::from(AppError::NotFound(huge));
        assert!(
            status_header_bytes(&status) < MAX_STATUS_BYTES,
            "{}",
            status_header_bytes(&status)
        );
    }
}
