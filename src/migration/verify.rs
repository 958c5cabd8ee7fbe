//! Verify: compares the legacy table and the new storage per `(user, campaign, day)` for the
//! five metrics both hold.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::NaiveDate;

use crate::domain::{EventType, LEGACY_COLUMNS, LegacyCounts};

/// A `(user, campaign, day)` key.
pub type Key = (String, String, NaiveDate);

/// What verify reads from the store for a range.
#[derive(Debug, Default)]
pub struct VerifyData {
    /// Legacy rows: key and the five counts (NULL read as 0).
    pub legacy: Vec<(Key, LegacyCounts)>,
    /// New rollups: key, event type code and total.
    pub new: Vec<(Key, i16, i64)>,
    /// The `(campaign, day)` keys set apart: the last backfill's unresolved ambiguous rows
    /// (`false`) and the rows an operator resolved as skipped (`true`). Shared by the chunks
    /// of one verify.
    pub ambiguous: Arc<SetApart>,
}

/// Keys verify sets apart, each with whether an operator resolved it (as skipped).
pub type SetApart = HashMap<(String, NaiveDate), bool>;

/// One metric of one key that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub user_id: String,
    pub campaign_id: String,
    pub date: NaiveDate,
    pub metric: &'static str,
    pub legacy: i64,
    pub new: i64,
}

/// What verify found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyOutcome {
    /// Keys compared (ambiguous ones aside).
    pub compared: u64,
    /// Keys whose counts differ.
    pub mismatches: u64,
    /// Keys set apart, not compared: the last backfill's ambiguous rows that no resolution
    /// covers, and rows resolved as skipped.
    pub ambiguous: u64,
    /// Of `ambiguous`, the keys resolved (as skipped on purpose).
    pub resolved: u64,
    /// The first differences, metric by metric.
    pub sample: Vec<Mismatch>,
}

impl VerifyOutcome {
    /// Adds the findings of another part of the same comparison (keys apart from this
    /// one's), keeping at most `sample_limit` differences.
    pub fn merge(&mut self, other: VerifyOutcome, sample_limit: usize) {
        self.compared += other.compared;
        self.mismatches += other.mismatches;
        self.ambiguous += other.ambiguous;
        self.resolved += other.resolved;
        let room = sample_limit.saturating_sub(self.sample.len());
        self.sample.extend(other.sample.into_iter().take(room));
    }
}

/// Compares both sides key by key; keeps at most `sample_limit` differences.
pub fn compare(data: VerifyData, sample_limit: usize) -> VerifyOutcome {
    let mut sides: BTreeMap<Key, (LegacyCounts, LegacyCounts)> = BTreeMap::new();
    for (key, counts) in data.legacy {
        sides.entry(key).or_default().0 = counts;
    }
    for (key, event_type, total) in data.new {
        if let Some(column) = EventType::from_code(event_type).and_then(EventType::legacy_index) {
            sides.entry(key).or_default().1[column] += total;
        }
    }
    let mut outcome = VerifyOutcome::default();
    for ((user_id, campaign_id, date), (legacy, new)) in sides {
        if let Some(resolved) = data.ambiguous.get(&(campaign_id.clone(), date)) {
            outcome.ambiguous += 1;
            outcome.resolved += u64::from(*resolved);
            continue;
        }
        outcome.compared += 1;
        if legacy == new {
            continue;
        }
        outcome.mismatches += 1;
        for (i, metric) in LEGACY_COLUMNS
            .map(EventType::legacy_column)
            .iter()
            .enumerate()
        {
            if legacy[i] != new[i] && outcome.sample.len() < sample_limit {
                outcome.sample.push(Mismatch {
                    user_id: user_id.clone(),
                    campaign_id: campaign_id.clone(),
                    date,
                    metric,
                    legacy: legacy[i],
                    new: new[i],
                });
            }
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(campaign: &str, day: u32) -> Key {
        (
            "u".into(),
            campaign.into(),
            NaiveDate::from_ymd_opt(2026, 1, day).unwrap(),
        )
    }

    #[test]
    fn finds_differences_on_either_side_and_sets_ambiguous_keys_apart() {
        let data = VerifyData {
            legacy: vec![
                (key("same", 1), [3, 1, 0, 0, 0]),
                (key("zero", 1), [0; 5]),
                (key("more-legacy", 1), [5, 0, 0, 0, 0]),
                (key("odd", 1), [-1, 0, 0, 0, 0]),
                (key("skipped", 1), [-2, 0, 0, 0, 0]),
            ],
            new: vec![
                (key("same", 1), 1, 3),
                (key("same", 1), 2, 1),
                // Clicks exist only in the new storage: not compared.
                (key("same", 1), 3, 9),
                (key("more-legacy", 1), 1, 4),
                (key("only-new", 2), 6, 2),
            ],
            ambiguous: Arc::new(HashMap::from([
                (("odd".to_owned(), key("odd", 1).2), false),
                (("skipped".to_owned(), key("skipped", 1).2), true),
            ])),
        };
        let outcome = compare(data, 10);
        assert_eq!(
            (
                outcome.compared,
                outcome.mismatches,
                outcome.ambiguous,
                outcome.resolved
            ),
            (4, 2, 2, 1)
        );
        let found: Vec<(&str, &str, i64, i64)> = outcome
            .sample
            .iter()
            .map(|m| (m.campaign_id.as_str(), m.metric, m.legacy, m.new))
            .collect();
        assert_eq!(
            found,
            [("more-legacy", "sent", 5, 4), ("only-new", "bounced", 0, 2)]
        );
    }
}
