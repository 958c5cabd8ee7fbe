//! The one error the use cases return, in flat categories that say what the caller can do
//! about it. Each lower layer's error converts into it once, here; the gRPC layer maps it to a
//! status in one exhaustive match.

use crate::domain::{CampaignId, LimitExceeded, TotalOverflow, ValidationError};
use crate::migration::TransitionRefused;
use crate::migration::ambiguous::ResolveRefused;
use crate::rollout::RolloutRefused;
use crate::storage::{LegacyOverflow, Refusal, StorageError};
use crate::telemetry::error_chain;

use super::StartRefused;

/// Why a use case did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request breaks a rule; nothing was done.
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationError),
    /// The request holds more items than allowed; nothing was done.
    #[error("{0}")]
    LimitExceeded(#[from] LimitExceeded),
    /// Events name campaigns that belong to other users: `(position among the caller's
    /// events, campaign)`; nothing was stored.
    #[error("campaigns owned by another user at positions {0:?}")]
    NotOwner(Vec<(usize, CampaignId)>),
    /// Events would take legacy counts past their column; nothing was stored.
    #[error("legacy counts would overflow: {0:?}")]
    LegacyOverflow(Vec<LegacyOverflow>),
    /// A total passes 64 bits.
    #[error("a total is out of range: {0}")]
    TotalOutOfRange(String),
    /// The phase cannot move as asked.
    #[error(transparent)]
    TransitionRefused(TransitionRefused),
    /// Ambiguous rows cannot be resolved as asked.
    #[error(transparent)]
    ResolveRefused(ResolveRefused),
    /// The rollout cannot change as asked.
    #[error(transparent)]
    RolloutRefused(RolloutRefused),
    /// A backfill cannot start now.
    #[error(transparent)]
    StartRefused(#[from] StartRefused),
    /// A rollup repair cannot cover the range asked (its raw events are no longer kept).
    #[error("{0}")]
    RepairRefused(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Too many writes are queued on this replica (this many events); retry later.
    #[error("too many writes are queued ({0} events)")]
    QueueFull(usize),
    /// The server is shutting down; retry on another replica.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Storage could not be reached or did not answer in time; the call may be retried.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a fault of the service or its database, not of the request.
    #[error("internal: {0}")]
    Internal(String),
}

impl AppError {
    /// The same error with the event positions it names moved by `offset`: what a chunk's
    /// refusal says about the whole stream the chunk came from.
    pub fn shifted(self, offset: usize) -> Self {
        match self {
            AppError::NotOwner(foreign) => AppError::NotOwner(
                foreign
                    .into_iter()
                    .map(|(at, campaign)| (at + offset, campaign))
                    .collect(),
            ),
            AppError::LegacyOverflow(mut overflows) => {
                for overflow in &mut overflows {
                    overflow.events.iter_mut().for_each(|at| *at += offset);
                }
                AppError::LegacyOverflow(overflows)
            }
            other => other,
        }
    }
}

impl From<TotalOverflow> for AppError {
    fn from(error: TotalOverflow) -> Self {
        AppError::TotalOutOfRange(error.to_string())
    }
}

impl From<Refusal> for AppError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NotOwner(foreign) => AppError::NotOwner(foreign),
            Refusal::LegacyOverflow(overflows) => AppError::LegacyOverflow(overflows),
            Refusal::Transition(refused) => AppError::TransitionRefused(refused),
            Refusal::Resolve(refused) => AppError::ResolveRefused(refused),
            Refusal::Rollout(refused) => AppError::RolloutRefused(refused),
        }
    }
}

impl From<StorageError> for AppError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::Refused(refusal) => refusal.into(),
            StorageError::OutOfRange(detail) => AppError::TotalOutOfRange(detail),
            StorageError::Unavailable(_)
            | StorageError::TimedOut(_)
            | StorageError::Unreachable(_) => AppError::Unavailable(error_chain(&error)),
            StorageError::Corrupt(_)
            | StorageError::Config(_)
            | StorageError::Schema(_)
            | StorageError::Internal(_) => AppError::Internal(error_chain(&error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_inside_storage_become_their_own_category() {
        let refused = StorageError::from(RolloutRefused::LegacyRetired);
        assert!(matches!(
            AppError::from(refused),
            AppError::RolloutRefused(RolloutRefused::LegacyRetired)
        ));
        let unavailable = AppError::from(StorageError::Unavailable(sqlx::Error::PoolTimedOut));
        match unavailable {
            AppError::Unavailable(text) => assert!(text.contains("pool timed out"), "{text}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(matches!(
            AppError::from(StorageError::Corrupt("phase".into())),
            AppError::Internal(_)
        ));
    }

    #[test]
    fn a_chunks_refusal_names_positions_in_the_whole_stream() {
        let campaign = CampaignId::parse("campaign_id", "c1".to_owned()).expect("valid id");
        match AppError::NotOwner(vec![(2, campaign)]).shifted(1_000) {
            AppError::NotOwner(foreign) => assert_eq!(foreign[0].0, 1_002),
            other => panic!("expected NotOwner, got {other:?}"),
        }
    }
}
