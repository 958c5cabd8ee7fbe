//! The storage contract and its backends.
//!
//! [`EventStore`] is the one contract every backend fulfils; [`SqliteStore`] and
//! [`PostgresStore`] each own their pool and run their own migrations. The entry point picks
//! one backend from the database URL ([`Backend::from_url`]); everything after it is generic.

mod batch;
mod error;
mod postgres;
mod sqlite;

use std::collections::HashMap;
use std::future::Future;

use chrono::NaiveDate;

use crate::domain::{CampaignId, DateRange, Event, Metrics, Scope, StorageSource, UserId};
use crate::migration::{Phase, PhaseState, Transition};

pub use error::StorageError;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// What a write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordOutcome {
    /// Events newly stored and counted.
    pub stored: u64,
    /// Events skipped because their idempotency key had been seen already.
    pub duplicates: u64,
}

impl std::ops::AddAssign for RecordOutcome {
    fn add_assign(&mut self, other: Self) {
        self.stored += other.stored;
        self.duplicates += other.duplicates;
    }
}

/// The storage contract: what the service needs from a database. One backend holds both
/// storages (the legacy table and the new event store) in one database, so that a write to
/// both is one transaction.
///
/// Every method is one short unit of work; writes are atomic.
pub trait EventStore: Send + Sync + 'static {
    /// Brings the schema up to date. Safe to run on every start and from several replicas.
    fn migrate(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Stores `events` in one transaction, in the storages the current migration phase
    /// writes (read in that same transaction): either every event is stored (or recognised
    /// as a duplicate by its idempotency key) everywhere it belongs, or nothing is.
    ///
    /// Refuses the whole batch with [`StorageError::CampaignOwnedByAnotherUser`] when an event
    /// names a campaign that belongs to another user; a campaign belongs to the first user
    /// that records an event for it, or to its user in the legacy table.
    fn record_events(
        &self,
        events: &[Event],
    ) -> impl Future<Output = Result<RecordOutcome, StorageError>> + Send;

    /// Totals of each of `user`'s `campaigns` over `range`, from `source`. Campaigns without
    /// events (or that belong to another user) are absent from the map.
    fn campaign_totals(
        &self,
        source: StorageSource,
        user: &UserId,
        campaigns: &[CampaignId],
        range: DateRange,
    ) -> impl Future<Output = Result<HashMap<CampaignId, Metrics>, StorageError>> + Send;

    /// Totals per day over `range` for the campaigns of `scope`, from `source`, in date
    /// order; days without events are absent.
    fn daily_totals(
        &self,
        source: StorageSource,
        scope: &Scope,
        range: DateRange,
    ) -> impl Future<Output = Result<Vec<(NaiveDate, Metrics)>, StorageError>> + Send;

    /// The current migration phase.
    fn phase(&self) -> impl Future<Output = Result<PhaseState, StorageError>> + Send;

    /// Moves to `target` if [`Phase::check_transition`] allows it, recording who, when and
    /// why in the same transaction. Moving to the current phase changes nothing.
    fn transition(
        &self,
        target: Phase,
        actor: &str,
        reason: &str,
    ) -> impl Future<Output = Result<PhaseState, StorageError>> + Send;

    /// The recorded phase changes, newest first, at most `limit`.
    fn transitions(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Transition>, StorageError>> + Send;

    /// Succeeds while the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Closes the pools once in-flight work is done.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// The phase stored under `name`.
fn parse_phase(name: &str) -> Result<Phase, StorageError> {
    Phase::from_name(name)
        .ok_or_else(|| StorageError::Corrupt(format!("unknown migration phase {name:?}")))
}

/// A stored transition row: from, to, actor, reason, when.
type TransitionRow = (
    String,
    String,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
);

fn transition_from_row(
    (from, to, actor, reason, at): TransitionRow,
) -> Result<Transition, StorageError> {
    Ok(Transition {
        from: parse_phase(&from)?,
        to: parse_phase(&to)?,
        actor,
        reason,
        at,
    })
}

/// The database backends, told apart by the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a database URL names: `sqlite:` or `postgres:`/`postgresql:`.
    pub fn from_url(url: &str) -> Result<Self, StorageError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => Err(StorageError::Config(format!(
                "unsupported database URL scheme {scheme:?}: use sqlite:// or postgres://"
            ))),
        }
    }
}

/// Pool settings shared by the backends.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Most connections a pool opens.
    pub max_connections: u32,
    /// How long a call waits for a connection before it fails as unavailable.
    pub acquire_timeout: std::time::Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: std::time::Duration::from_secs(5),
        }
    }
}
