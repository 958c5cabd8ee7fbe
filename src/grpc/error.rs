//! The one mapping from every error a handler can meet to a `tonic::Status`.
//!
//! Clients get a short message and, for bad input, a `google.rpc.BadRequest` detail naming
//! every field; internal details go to the log only.

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::app::StartRefused;
use crate::domain::{FieldViolation, LimitExceeded, ValidationError};
use crate::rollout::RolloutRefused;
use crate::storage::StorageError;

/// Most violations named in a status message; the rest are counted. gRPC sends the message
/// in a header, so it must stay small.
const MAX_VIOLATIONS_IN_MESSAGE: usize = 20;
/// Most violations carried in the `BadRequest` detail (also sent in a header).
const MAX_VIOLATIONS_IN_DETAILS: usize = 100;

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
    /// The request is valid but the system is not in a state to carry it out.
    #[error("{0}")]
    Precondition(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
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
                            format!("campaign \"{campaign}\" belongs to another user"),
                        )
                    })
                    .collect(),
            ),
            other => ApiError::Storage(other),
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
            ApiError::Precondition(message) => {
                let mut status = Status::failed_precondition(message);
                *status.metadata_mut() = metadata;
                return status;
            }
            ApiError::NotFound(message) => {
                let mut status = Status::not_found(message);
                *status.metadata_mut() = metadata;
                return status;
            }
            ApiError::Storage(StorageError::RolloutRefused(refused)) => {
                let code = match refused {
                    RolloutRefused::VersionConflict { .. } => Code::Aborted,
                    RolloutRefused::NotVerified(_) | RolloutRefused::LegacyRetired => {
                        Code::FailedPrecondition
                    }
                };
                let mut status = Status::new(code, refused.to_string());
                *status.metadata_mut() = metadata;
                return status;
            }
            ApiError::Storage(StorageError::TransitionRefused(refused)) => {
                let mut status = Status::failed_precondition(refused.to_string());
                *status.metadata_mut() = metadata;
                return status;
            }
            ApiError::Storage(error) => {
                let (code, message) = storage_status(&error);
                let mut status = Status::new(code, message);
                *status.metadata_mut() = metadata;
                return status;
            }
        };
        let message = describe(message, &violations);
        let details = ErrorDetails::with_bad_request(
            violations
                .into_iter()
                .take(MAX_VIOLATIONS_IN_DETAILS)
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

/// `message: field: reason; field: reason (and N more)`.
fn describe(message: &str, violations: &[FieldViolation]) -> String {
    let mut text = String::from(message);
    for (i, violation) in violations
        .iter()
        .take(MAX_VIOLATIONS_IN_MESSAGE)
        .enumerate()
    {
        text.push_str(if i == 0 { ": " } else { "; " });
        text.push_str(&violation.to_string());
    }
    if violations.len() > MAX_VIOLATIONS_IN_MESSAGE {
        let more = violations.len() - MAX_VIOLATIONS_IN_MESSAGE;
        text.push_str(&format!(" (and {more} more)"));
    }
    text
}

/// Code and client message for a storage failure; the details are logged here.
fn storage_status(error: &StorageError) -> (Code, &'static str) {
    match error {
        StorageError::Unavailable(source) => {
            tracing::warn!(error = %source, "storage unavailable");
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
        StorageError::Config(_)
        | StorageError::Migration(_)
        | StorageError::Corrupt(_)
        | StorageError::Internal(_) => {
            tracing::error!(error = %error, source = ?std::error::Error::source(error), "storage failure");
            (Code::Internal, "internal error")
        }
    }
}
