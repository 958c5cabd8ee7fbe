//! Rollup repair's rule: a campaign's day is what the backfill copied into it from legacy
//! plus what its raw events count; a stored rollup that says otherwise is fixed.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;

use super::{EventTotals, TotalOverflow};

/// A campaign rollup row: user, campaign, day.
pub type RollupKey = (String, String, NaiveDate);

/// A rollup row that does not hold what its sources say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupFix {
    pub key: RollupKey,
    /// What the rollup holds.
    pub stored: EventTotals,
    /// Backfilled history plus raw events.
    pub expected: EventTotals,
}

/// Every key of `stored`, `raw` and `backfilled` whose stored totals differ from
/// `backfilled + raw`, in key order.
pub fn rollup_fixes(
    stored: &BTreeMap<RollupKey, EventTotals>,
    raw: &BTreeMap<RollupKey, EventTotals>,
    backfilled: &BTreeMap<RollupKey, EventTotals>,
) -> Result<Vec<RollupFix>, TotalOverflow> {
    let keys: BTreeSet<&RollupKey> = stored
        .keys()
        .chain(raw.keys())
        .chain(backfilled.keys())
        .collect();
    let mut fixes = Vec::new();
    for key in keys {
        let mut expected = backfilled.get(key).copied().unwrap_or_default();
        expected.add_all(raw.get(key).copied().unwrap_or_default())?;
        let stored = stored.get(key).copied().unwrap_or_default();
        if stored != expected {
            fixes.push(RollupFix {
                key: key.clone(),
                stored,
                expected,
            });
        }
    }
    Ok(fixes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(campaign: &str) -> RollupKey {
        (
            "u1".into(),
            campaign.into(),
            NaiveDate::from_ymd_opt(2026, 5, 1).unwrap(),
        )
    }

    fn sent(n: u64) -> EventTotals {
        EventTotals {
            sent: n,
            ..EventTotals::default()
        }
    }

    #[test]
    fn a_row_is_its_backfilled_history_plus_its_raw_events() {
        let stored = BTreeMap::from([
            (key("right"), sent(7)),
            (key("inflated"), sent(103)),
            (key("no-sources"), sent(4)),
        ]);
        let raw = BTreeMap::from([
            (key("right"), sent(2)),
            (key("inflated"), sent(3)),
            (key("missing"), sent(1)),
        ]);
        let backfilled = BTreeMap::from([(key("right"), sent(5))]);
        let fixes = rollup_fixes(&stored, &raw, &backfilled).unwrap();
        let summary: Vec<(&str, u64, u64)> = fixes
            .iter()
            .map(|f| (f.key.1.as_str(), f.stored.sent, f.expected.sent))
            .collect();
        assert_eq!(
            summary,
            [
                ("inflated", 103, 3),
                ("missing", 0, 1),
                ("no-sources", 4, 0)
            ]
        );
    }
}
