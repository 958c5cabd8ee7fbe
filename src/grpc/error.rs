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

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::app::IngestError;
use crate::app::StartRefused;
use crate::domain::{FieldViolation, LimitExceeded, ValidationError, echo};
use crate::rollout::RolloutRefused;
use crate::storage::{LEGACY_COLUMN_MAX, StorageError};

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

/// Everything that can make a call fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    LimitExceeded(#[from] LimitExceeded),
    /// Fields naming campaigns that belong to other users.
    #[error("campaign owned by another user")]
    NotOwner(Vec<FieldViolation>),
    /// Events that would take a count past what its storage holds.
    #[error("count out of range")]
    OutOfRange(Vec<FieldViolation>),
    /// The request is valid but the system is not in a state to carry it out.
    #[error("{0}")]
    Precondition(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A write the queue could not take or finish (full, shutting down, or failed in a way
    /// that may pass); never [`IngestError::Storage`], which maps as [`ApiError::Storage`].
    #[error(transparent)]
    NotQueued(IngestError),
}

impl From<StartRefused> for ApiError {
    fn from(refused: StartRefused) -> Self {
        match refused {
            StartRefused::Storage(error) => ApiError::Storage(error),
            other => ApiError::Precondition(other.to_string()),
        }
    }
}

impl From<StartRefused> for Status {
    fn from(refused: StartRefused) -> Self {
        ApiError::from(refused).into()
    }
}

impl ApiError {
    /// Maps a write's storage error, naming the event at batch position `i` as `path(i)`.
    pub fn from_write(error: StorageError, path: impl Fn(usize) -> String) -> Self {
        match error {
            StorageError::CampaignOwnedByAnotherUser(foreign) => ApiError::NotOwner(
                foreign
                    .into_iter()
                    .map(|(index, campaign)| {
                        FieldViolation::new(
                            format!("{}.campaign_id", path(index)),
                            format!(
                                "campaign {} belongs to another user",
                                echo(campaign.as_str())
                            ),
                        )
                    })
                    .collect(),
            ),
            StorageError::LegacyOverflow(overflows) => ApiError::OutOfRange(
                overflows
                    .into_iter()
                    .flat_map(|overflow| {
                        let path = &path;
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
                            FieldViolation::new(
                                format!("{}.count", path(index)),
                                description.clone(),
                            )
                        })
                    })
                    .collect(),
            ),
            other => ApiError::Storage(other),
        }
    }

    /// Maps a queued write's error, naming the event at position `i` of the caller's events
    /// as `path(i)`.
    pub fn from_ingest(error: IngestError, path: impl Fn(usize) -> String) -> Self {
        match error {
            IngestError::Storage(error) => ApiError::from_write(error, path),
            other => ApiError::NotQueued(other),
        }
    }

    /// The status for this error, with `metadata` attached.
    pub fn into_status_with(self, metadata: MetadataMap) -> Status {
        let (code, message, violations) = match self {
            ApiError::Invalid(error) => {
                (Code::InvalidArgument, "invalid request", error.violations)
            }
            ApiError::LimitExceeded(limit) => (
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
            ApiError::NotOwner(violations) => {
                (Code::PermissionDenied, "permission denied", violations)
            }
            ApiError::OutOfRange(violations) => (
                Code::OutOfRange,
                "a count would pass what the legacy table holds; nothing was stored",
                violations,
            ),
            ApiError::Precondition(message) => {
                return plain(Code::FailedPrecondition, message, metadata);
            }
            ApiError::NotFound(message) => return plain(Code::NotFound, message, metadata),
            ApiError::Storage(StorageError::RolloutRefused(refused)) => {
                let code = match refused {
                    RolloutRefused::VersionConflict { .. } => Code::Aborted,
                    RolloutRefused::NotVerified(_) | RolloutRefused::LegacyRetired => {
                        Code::FailedPrecondition
                    }
                };
                return plain(code, refused.to_string(), metadata);
            }
            ApiError::Storage(StorageError::TransitionRefused(refused)) => {
                return plain(Code::FailedPrecondition, refused.to_string(), metadata);
            }
            ApiError::Storage(StorageError::ResolveRefused(refused)) => {
                return plain(Code::FailedPrecondition, refused.to_string(), metadata);
            }
            ApiError::Storage(error) => {
                let (code, message) = storage_status(&error);
                return plain(code, message.to_owned(), metadata);
            }
            ApiError::NotQueued(error) => {
                let code = match error {
                    IngestError::QueueFull(_) => Code::ResourceExhausted,
                    IngestError::Storage(_) | IngestError::Retry(_) | IngestError::ShuttingDown => {
                        Code::Unavailable
                    }
                };
                return plain(code, queue_message(&error), metadata);
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
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        error.into_status_with(MetadataMap::new())
    }
}

impl From<ValidationError> for Status {
    fn from(error: ValidationError) -> Self {
        ApiError::from(error).into()
    }
}

impl From<LimitExceeded> for Status {
    fn from(error: LimitExceeded) -> Self {
        ApiError::from(error).into()
    }
}

impl From<StorageError> for Status {
    fn from(error: StorageError) -> Self {
        ApiError::from(error).into()
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

/// The status of a single event that was not acknowledged (`RecordEvent`).
pub fn ingest_status(error: IngestError) -> Status {
    ApiError::from_ingest(error, |_| "event".to_owned()).into()
}

/// The client's message for a write the queue could not take or finish.
fn queue_message(error: &IngestError) -> String {
    match error {
        IngestError::QueueFull(events) => {
            format!("too many writes are queued on this replica ({events} events); retry later")
        }
        IngestError::ShuttingDown => {
            "the server is shutting down; retry on another replica".to_owned()
        }
        IngestError::Storage(_) | IngestError::Retry(_) => {
            "storage is unavailable, retry later".to_owned()
        }
    }
}

/// Code and client message for a storage failure; the details are logged here.
fn storage_status(error: &StorageError) -> (Code, &'static str) {
    match error {
        StorageError::Unavailable(source) => {
            tracing::warn!(error = %source, "storage unavailable");
            (Code::Unavailable, "storage is unavailable, retry later")
        }
        StorageError::TimedOut(limit) => {
            tracing::warn!(?limit, "the database did not answer in time");
            (Code::Unavailable, "storage is unavailable, retry later")
        }
        StorageError::CampaignOwnedByAnotherUser(_) => {
            // Writes map this with the event's position (`ApiError::from_write`).
            (Code::PermissionDenied, "campaign belongs to another user")
        }
        StorageError::RolloutRefused(_) => {
            // Handlers map this with its reason and code (ABORTED for a version conflict).
            (Code::FailedPrecondition, "rollout change refused")
        }
        StorageError::TransitionRefused(_) => {
            // Handlers map this with its reason (`ApiError::Refused`).
            (Code::FailedPrecondition, "phase transition refused")
        }
        StorageError::ResolveRefused(_) => {
            // Handlers map this with its reason.
            (Code::FailedPrecondition, "resolution refused")
        }
        StorageError::LegacyOverflow(_) => {
            // Writes map this with the events' positions (`ApiError::from_write`).
            (
                Code::OutOfRange,
                "a count would pass what the legacy table holds",
            )
        }
        StorageError::OutOfRange(detail) => {
            tracing::warn!(%detail, "a total is out of range");
            (
                Code::OutOfRange,
                "a total is out of range: it passes 64 bits (18446744073709551615)",
            )
        }
        StorageError::Config(_)
        | StorageError::Migration(_)
        | StorageError::Corrupt(_)
        | StorageError::Internal(_) => {
            tracing::error!(error = %error, source = ?std::error::Error::source(error), "storage failure");
            (Code::Internal, "internal error")
        }
    }
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
        let status = Status::from(ApiError::Invalid(ValidationError { violations }));
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
        let status = Status::from(ApiError::Invalid(ValidationError::single(
            huge.clone(),
            huge.clone(),
        )));
        assert!(
            status_header_bytes(&status) < MAX_STATUS_BYTES,
            "{}",
            status_header_bytes(&status)
        );
        let status = Status::from(ApiError::NotFound(huge));
        assert!(
            status_header_bytes(&status) < MAX_STATUS_BYTES,
            "{}",
            status_header_bytes(&status)
        );
    }
}
