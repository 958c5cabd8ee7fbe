//! Ambiguous legacy rows: why a backfill did not copy a row, and how an operator resolves it.
//!
//! A backfill reports, instead of copying, a legacy row that looks wrong (a NULL or negative
//! count, more positive replies than replies, a campaign under several users, …). The
//! operator then resolves each such row once, by `(campaign, day)`: either **copy** it (NULL
//! read as 0; rows that cannot be copied without breaking a rule, such as a negative count or
//! a campaign owned by another user, are refused) or **skip** it on purpose. Resolutions are
//! kept per legacy key, so later backfills and verifies honour them, and each call is audited
//! with who, why and how many.

use chrono::{DateTime, NaiveDate, Utc};

/// Why a backfill reported a legacy row instead of copying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AmbiguityKind {
    /// A count is NULL.
    NullCount,
    /// A count is negative.
    NegativeCount,
    /// A count is larger than a legacy `int` column holds.
    TooLarge,
    /// More positive replies than replies on one day.
    PositiveRepliesAboveReplied,
    /// The campaign appears under several users in the legacy table.
    SeveralUsers,
    /// The new storage says another user owns the campaign.
    OwnedByAnotherUser,
    /// The new storage already holds more than legacy for this day.
    NewStorageAhead,
    /// The ids are not ones the API accepts.
    InvalidId,
}

impl AmbiguityKind {
    pub const ALL: [AmbiguityKind; 8] = [
        AmbiguityKind::NullCount,
        AmbiguityKind::NegativeCount,
        AmbiguityKind::TooLarge,
        AmbiguityKind::PositiveRepliesAboveReplied,
        AmbiguityKind::SeveralUsers,
        AmbiguityKind::OwnedByAnotherUser,
        AmbiguityKind::NewStorageAhead,
        AmbiguityKind::InvalidId,
    ];

    /// The name stored in the database and accepted by the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            AmbiguityKind::NullCount => "null-count",
            AmbiguityKind::NegativeCount => "negative-count",
            AmbiguityKind::TooLarge => "too-large",
            AmbiguityKind::PositiveRepliesAboveReplied => "positive-replies-above-replied",
            AmbiguityKind::SeveralUsers => "several-users",
            AmbiguityKind::OwnedByAnotherUser => "owned-by-another-user",
            AmbiguityKind::NewStorageAhead => "new-storage-ahead",
            AmbiguityKind::InvalidId => "invalid-id",
        }
    }

    /// The kind named `name` (as [`AmbiguityKind::name`] spells it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Why one row was reported: the kind, and a sentence with the row's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ambiguity {
    pub kind: AmbiguityKind,
    pub detail: String,
}

impl Ambiguity {
    pub fn new(kind: AmbiguityKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// What the operator decided for an ambiguous row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// Copy the row into the new storage, NULL read as 0.
    Copy,
    /// Leave the row out of the new storage, on purpose.
    Skip,
}

impl Resolution {
    /// The name stored in the database and shown to people.
    pub const fn name(self) -> &'static str {
        match self {
            Resolution::Copy => "copy",
            Resolution::Skip => "skip",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Resolution::Copy, Resolution::Skip]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// Which unresolved rows one resolution covers. An empty list does not narrow; with both
/// lists empty, every unresolved row is covered. Set lists must all match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolveFilter {
    /// `(campaign, day)` keys of legacy rows.
    pub rows: Vec<(String, NaiveDate)>,
    /// Kinds of ambiguity.
    pub kinds: Vec<AmbiguityKind>,
}

impl ResolveFilter {
    /// Whether a row reported with `kind` (unknown for rows reported before kinds were kept)
    /// falls under the filter.
    pub fn matches(&self, campaign_id: &str, day: NaiveDate, kind: Option<AmbiguityKind>) -> bool {
        let row_matches = self.rows.is_empty()
            || self
                .rows
                .iter()
                .any(|(campaign, d)| campaign == campaign_id && *d == day);
        let kind_matches =
            self.kinds.is_empty() || kind.is_some_and(|kind| self.kinds.contains(&kind));
        row_matches && kind_matches
    }

    /// How the filter is kept in the audit: `all`, or its parts.
    pub fn describe(&self) -> String {
        if self.rows.is_empty() && self.kinds.is_empty() {
            return "all".to_owned();
        }
        let mut parts = Vec::new();
        if !self.kinds.is_empty() {
            let kinds: Vec<&str> = self.kinds.iter().map(|k| k.name()).collect();
            parts.push(format!("kinds={}", kinds.join(",")));
        }
        if !self.rows.is_empty() {
            let rows: Vec<String> = self
                .rows
                .iter()
                .map(|(campaign, day)| format!("{campaign}/{day}"))
                .collect();
            parts.push(format!("rows={}", rows.join(",")));
        }
        parts.join(" ")
    }
}

/// A resolution as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveRequest {
    pub resolution: Resolution,
    pub filter: ResolveFilter,
    pub actor: String,
    pub reason: String,
}

/// What a resolution did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolveOutcome {
    /// The audit entry's id (0 when nothing matched, and nothing was recorded).
    pub resolution_id: u64,
    /// Rows resolved by this call.
    pub resolved: u64,
    /// Of them, rows whose counts were added to the new storage.
    pub copied: u64,
    /// Unresolved rows left after this call.
    pub unresolved: u64,
}

/// One audited resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolutionRecord {
    pub id: u64,
    pub resolution: Resolution,
    pub actor: String,
    pub reason: String,
    /// The filter, as [`ResolveFilter::describe`] wrote it.
    pub filter: String,
    pub rows: u64,
    pub copied: u64,
    pub at: DateTime<Utc>,
}

/// Why a resolution was refused as a whole (nothing was resolved).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot copy {count} of the selected rows (first: {campaign_id}/{day}: {why}); \
     resolve them with SKIP, or narrow the filter"
)]
pub struct ResolveRefused {
    pub count: u64,
    pub campaign_id: String,
    pub day: NaiveDate,
    pub why: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 1, d).unwrap()
    }

    #[test]
    fn names_round_trip() {
        for kind in AmbiguityKind::ALL {
            assert_eq!(AmbiguityKind::from_name(kind.name()), Some(kind));
        }
        for resolution in [Resolution::Copy, Resolution::Skip] {
            assert_eq!(Resolution::from_name(resolution.name()), Some(resolution));
        }
        assert_eq!(AmbiguityKind::from_name("nope"), None);
    }

    #[test]
    fn filters_narrow_by_row_and_by_kind() {
        let all = ResolveFilter::default();
        assert!(all.matches("c", day(1), None));
        assert_eq!(all.describe(), "all");

        let by_kind = ResolveFilter {
            kinds: vec![AmbiguityKind::NullCount],
            ..ResolveFilter::default()
        };
        assert!(by_kind.matches("c", day(1), Some(AmbiguityKind::NullCount)));
        assert!(!by_kind.matches("c", day(1), Some(AmbiguityKind::NegativeCount)));
        assert!(!by_kind.matches("c", day(1), None));

        let both = ResolveFilter {
            rows: vec![("c".into(), day(2))],
            kinds: vec![AmbiguityKind::NullCount],
        };
        assert!(both.matches("c", day(2), Some(AmbiguityKind::NullCount)));
        assert!(!both.matches("c", day(1), Some(AmbiguityKind::NullCount)));
        assert!(!both.matches("d", day(2), Some(AmbiguityKind::NullCount)));
        assert_eq!(both.describe(), "kinds=null-count rows=c/2026-01-02");
    }
}
