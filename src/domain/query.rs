use super::{CampaignId, DateRange, Granularity, Scope, UserId};

/// Totals of some of one user's campaigns over a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignStatsQuery {
    pub user: UserId,
    /// In the order the client asked for them (repeats allowed).
    pub campaigns: Vec<CampaignId>,
    pub range: DateRange,
}

/// A series of buckets over a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesQuery {
    pub scope: Scope,
    pub range: DateRange,
    pub granularity: Granularity,
    /// Zero-fill buckets without activity instead of omitting them.
    pub fill_empty: bool,
}
