//! The domain: events, metrics, date ranges and buckets, and the validation rules that every
//! entry point shares. Nothing here knows about gRPC or SQL.

mod auth;
mod event;
mod ids;
mod query;
mod range;
mod repair;
mod text;
mod totals;
mod validation;

pub use auth::{Caller, Role, Tokens, TokensFileError, token_sha256_hex};
pub use event::{
    EVENT_TYPES, Event, EventType, EventTypeNames, LEGACY_COLUMN_COUNT, LEGACY_COLUMN_MAX,
    LEGACY_COLUMNS, LegacyCounts, MAX_EVENT_COUNT, RawEvent, event_time_window, rollup_columns,
};
pub use ids::{CampaignId, MAX_ID_BYTES, UserId, validate_id};
pub use query::{CampaignStatsQuery, SeriesQuery};
pub use range::{DateRange, Granularity, MAX_RANGE_DAYS, bucket_series, parse_date};
pub use repair::{RollupFix, RollupKey, rollup_fixes};
pub use text::{MAX_TEXT_BYTES, UNKNOWN_ACTOR, parse_actor, parse_reason, validate_text};
pub use totals::{EventTotals, TotalOverflow};
pub use validation::{ECHO_CHARS, FieldViolation, LimitExceeded, ValidationError, echo};

/// Most events one `RecordEvents` call may carry.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Most campaigns one `GetStatsForCampaigns` call may name.
pub const MAX_CAMPAIGNS_PER_READ: usize = 1_000;

/// Which campaigns a series read covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `None`: every user (the operator's view).
    pub user: Option<UserId>,
    /// Empty: every campaign of the user (or of all users).
    pub campaigns: Vec<CampaignId>,
}

/// Which storage answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageSource {
    /// The legacy wide table.
    Legacy,
    /// The event-sourced store and its rollups.
    New,
}

impl StorageSource {
    /// `legacy` or `new`: as stored, logged, labelled and audited.
    pub fn name(self) -> &'static str {
        match self {
            StorageSource::Legacy => "legacy",
            StorageSource::New => "new",
        }
    }

    /// The storage [`StorageSource::name`] spells `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [StorageSource::Legacy, StorageSource::New]
            .into_iter()
            .find(|source| source.name() == name)
    }
}

/// A read's result together with the storage that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<T> {
    pub value: T,
    pub source: StorageSource,
}
