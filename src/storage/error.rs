use crate::domain::{CampaignId, EventType, TotalOverflow};
use crate::migration::TransitionRefused;
use crate::migration::ambiguous::ResolveRefused;
use crate::rollout::RolloutRefused;

/// One legacy count a write would take past what its `int` column holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyOverflow {
    /// Positions in the batch of the events adding to that count.
    pub events: Vec<usize>,
    pub campaign_id: String,
    pub day: chrono::NaiveDate,
    pub event_type: EventType,
    /// The count the legacy row holds now.
    pub current: i64,
}

pub use crate::domain::LEGACY_COLUMN_MAX;

/// Why a rule refused work that storage checks inside the same transaction as the change
/// (ownership, the legacy column's range, the phase machine, a resolution, a rollout
/// change's preconditions): the refusals of the rules, carried up unchanged.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Events of a batch name campaigns that belong to other users: `(index in the batch,
    /// campaign)` for each.
    #[error("campaigns owned by another user at batch positions {0:?}")]
    NotOwner(Vec<(usize, CampaignId)>),
    /// The batch would take legacy counts past [`LEGACY_COLUMN_MAX`].
    #[error("legacy counts would overflow: {0:?}")]
    LegacyOverflow(Vec<LegacyOverflow>),
    /// The migration phase cannot move as asked.
    #[error(transparent)]
    Transition(#[from] TransitionRefused),
    /// A resolution of ambiguous rows cannot be applied as asked.
    #[error(transparent)]
    Resolve(#[from] ResolveRefused),
    /// The rollout cannot change as asked.
    #[error(transparent)]
    Rollout(#[from] RolloutRefused),
}

/// What can go wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A rule refused the work inside its transaction; nothing of it was stored.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A total passes the range the service or the database sums in (64 bits).
    #[error("a total is out of range: {0}")]
    OutOfRange(String),
    /// The database holds a value this version cannot read (e.g. an unknown phase name).
    #[error("unreadable stored data: {0}")]
    Corrupt(String),
    /// The database cannot be reached or is overloaded; the call may be retried.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The database could not be connected to at start, with the cause in a few words.
    #[error("{0}")]
    Unreachable(String),
    /// The database did not answer a call within its statement timeout (plus a margin); the
    /// call may be retried.
    #[error("the database did not answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// The database URL or settings are unusable.
    #[error("database configuration: {0}")]
    Config(String),
    /// The schema could not be brought up to date.
    #[error("database schema update failed")]
    Schema(#[from] sqlx::migrate::MigrateError),
    /// Anything else the database reported.
    #[error("database error")]
    Internal(#[source] sqlx::Error),
}

impl StorageError {
    /// Whether trying the same work again may succeed: the database was unreachable, busy,
    /// or did not answer in time.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StorageError::Unavailable(_) | StorageError::TimedOut(_) | StorageError::Unreachable(_)
        )
    }
}

impl From<sqlx::Error> for StorageError {
    fn from(error: sqlx::Error) -> Self {
        if is_transient(&error) {
            StorageError::Unavailable(error)
        } else if is_overflow(&error) {
            StorageError::OutOfRange(error.to_string())
        } else {
            StorageError::Internal(error)
        }
    }
}

impl From<TransitionRefused> for StorageError {
    fn from(refused: TransitionRefused) -> Self {
        StorageError::Refused(refused.into())
    }
}

impl From<ResolveRefused> for StorageError {
    fn from(refused: ResolveRefused) -> Self {
        StorageError::Refused(refused.into())
    }
}

impl From<RolloutRefused> for StorageError {
    fn from(refused: RolloutRefused) -> Self {
        StorageError::Refused(refused.into())
    }
}

impl From<TotalOverflow> for StorageError {
    fn from(error: TotalOverflow) -> Self {
        StorageError::OutOfRange(error.to_string())
    }
}

/// A sum past 64 bits: PostgreSQL's `numeric_value_out_of_range` (22003), SQLite's
/// "integer overflow" (raised by `SUM`).
fn is_overflow(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                db.message().contains("integer overflow")
            } else {
                db.code().as_deref() == Some("22003")
            }
        }
        _ => false,
    }
}

/// Errors a retry may cure: connectivity, pool exhaustion, lock contention, conflicts between
/// concurrent transactions, a server shutting down.
fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
                matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(5 | 6))
            } else {
                // PostgreSQL SQLSTATE classes: 08 connection, 40 transaction rollback
                // (serialization failure, deadlock), 53 insufficient resources, 57P0x shutdown;
                // and 57014 (a statement cancelled by `statement_timeout`), 55P03 (a lock not
                // granted in time).
                ["08", "40", "53", "57P0", "57014", "55P03"]
                    .iter()
                    .any(|class| code.starts_with(class))
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_and_silent_databases_are_retryable_refusals_are_not() {
        assert!(StorageError::Unavailable(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(StorageError::TimedOut(std::time::Duration::from_secs(1)).is_retryable());
        assert!(!StorageError::OutOfRange("sum".into()).is_retryable());
        assert!(!StorageError::Corrupt("phase".into()).is_retryable());
    }
}
