//! The backfill's rules: what a legacy row becomes in the new storage.
//!
//! A backfill adds to the new storage, for each legacy row, the difference between the
//! legacy counts and what the new storage already holds for that `(user, campaign, day)`.
//! Before DUAL_WRITE nothing reaches the new storage but clicks (which legacy has no column
//! for), and from DUAL_WRITE on every event is written to both in one transaction, so the
//! difference is exactly the history only legacy has. That makes the backfill correct on
//! the day dual-write began (events of that day already in both are not counted twice),
//! idempotent (a second run finds nothing missing), resumable from any checkpoint, and
//! indifferent to live dual writes landing between its batches.

use chrono::NaiveDate;

use super::ambiguous::{Ambiguity, AmbiguityKind, Resolution, ResolveRefused};
use crate::domain::{LEGACY_COLUMN_COUNT, LEGACY_COLUMN_MAX, LegacyCounts};

pub use crate::domain::LEGACY_COLUMNS;

/// One row of `campaign_daily_stat_entries` as stored (counts may be NULL or negative in a
/// legacy table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyRow {
    pub campaign_id: String,
    pub user_id: String,
    pub stat_date: NaiveDate,
    /// sent, opened, replied, positive_replies, bounced.
    pub counts: [Option<i64>; LEGACY_COLUMN_COUNT],
}

/// What the backfill does with one legacy row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every count is zero: nothing to copy.
    AllZero,
    /// The new storage already holds these counts.
    AlreadyPresent,
    /// Add these amounts (per legacy column) to the new storage.
    Copy(LegacyCounts),
    /// Not copied; reported with the reason.
    Ambiguous(Ambiguity),
}

/// What else the store knows about a legacy row's campaign.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowContext {
    /// The five counts the new storage holds for the row's `(user, campaign, day)`.
    pub in_new: LegacyCounts,
    /// The campaign appears under more than one user in the legacy table.
    pub several_users: bool,
    /// The user the new storage says owns the campaign, if it knows it.
    pub owner: Option<String>,
    /// What the operator decided for this `(campaign, day)`, if it was ambiguous before.
    pub resolution: Option<Resolution>,
}

/// Which rules a row is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rules {
    /// A backfill's: anything that looks wrong is reported.
    Strict,
    /// An operator's COPY resolution: a NULL count reads as 0, and more positive replies than
    /// replies is taken as it is. What would break a rule of the new storage (a negative
    /// count, another owner, …) is still refused.
    Copy,
}

const NAMES: [&str; 5] = ["sent", "opened", "replied", "positive_replies", "bounced"];

/// Decides what to do with `row` by the backfill's rules.
pub fn classify(row: &LegacyRow, context: &RowContext) -> Verdict {
    judge(row, context, Rules::Strict)
}

/// What an operator's COPY resolution adds for `row`: the missing counts (`None` when the new
/// storage already holds them all), or why the row still cannot be copied.
pub fn copy_on_resolution(
    row: &LegacyRow,
    context: &RowContext,
) -> Result<Option<LegacyCounts>, Ambiguity> {
    match judge(row, context, Rules::Copy) {
        Verdict::Copy(missing) => match valid_ids(row) {
            Ok(()) => Ok(Some(missing)),
            Err(ambiguity) => Err(ambiguity),
        },
        Verdict::AllZero | Verdict::AlreadyPresent => Ok(None),
        Verdict::Ambiguous(ambiguity) => Err(ambiguity),
    }
}

fn judge(row: &LegacyRow, context: &RowContext, rules: Rules) -> Verdict {
    use AmbiguityKind as Kind;
    let ambiguous = |kind, detail: String| Verdict::Ambiguous(Ambiguity::new(kind, detail));
    let mut counts = [0i64; 5];
    for (i, count) in row.counts.iter().enumerate() {
        match count {
            None if rules == Rules::Copy => counts[i] = 0,
            None => return ambiguous(Kind::NullCount, format!("{} is NULL", NAMES[i])),
            Some(n) if *n < 0 => {
                return ambiguous(
                    Kind::NegativeCount,
                    format!("{} is negative ({n})", NAMES[i]),
                );
            }
            Some(n) if *n > LEGACY_COLUMN_MAX => {
                return ambiguous(
                    Kind::TooLarge,
                    format!(
                        "{} is {n}, more than a legacy int column holds ({LEGACY_COLUMN_MAX})",
                        NAMES[i]
                    ),
                );
            }
            Some(n) => counts[i] = *n,
        }
    }
    // Replies come days after sends, so replied > sent on one day is normal; a positive reply
    // is a kind of reply, so more positive replies than replies on one day is not.
    let [_, _, replied, positive_replies, _] = counts;
    if positive_replies > replied && rules == Rules::Strict {
        return ambiguous(
            Kind::PositiveRepliesAboveReplied,
            format!("positive_replies ({positive_replies}) > replied ({replied})"),
        );
    }
    if context.several_users {
        return ambiguous(
            Kind::SeveralUsers,
            "the campaign appears under several users".to_owned(),
        );
    }
    if let Some(owner) = context
        .owner
        .as_ref()
        .filter(|owner| **owner != row.user_id)
    {
        return ambiguous(
            Kind::OwnedByAnotherUser,
            format!("the campaign belongs to user {owner:?} in the new storage"),
        );
    }
    if counts == [0; 5] {
        return Verdict::AllZero;
    }
    let mut missing = [0i64; 5];
    for i in 0..5 {
        missing[i] = counts[i] - context.in_new[i];
        if missing[i] < 0 {
            return ambiguous(
                Kind::NewStorageAhead,
                format!(
                    "the new storage has more {} ({}) than legacy ({})",
                    NAMES[i], context.in_new[i], counts[i]
                ),
            );
        }
    }
    if missing == [0; 5] {
        Verdict::AlreadyPresent
    } else {
        Verdict::Copy(missing)
    }
}

/// Ids the API would refuse stay out of the new storage too.
fn valid_ids(row: &LegacyRow) -> Result<(), Ambiguity> {
    use crate::domain::validate_id;
    validate_id("user_id", &row.user_id)
        .and_then(|()| validate_id("campaign_id", &row.campaign_id))
        .map_err(|invalid| {
            Ambiguity::new(
                AmbiguityKind::InvalidId,
                format!("not a valid id: {invalid}"),
            )
        })
}

/// What a backfill adds to the new storage's rollups for one legacy row: the counts of each
/// legacy column it lacks. Legacy counts are a day's aggregates, not events, so they are
/// copied whole, however large (up to what the legacy column holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupCopy {
    pub user_id: String,
    pub campaign_id: String,
    pub day: NaiveDate,
    /// Per legacy column, in [`LEGACY_COLUMNS`] order.
    pub missing: LegacyCounts,
}

impl RollupCopy {
    fn of(row: &LegacyRow, missing: LegacyCounts) -> Self {
        Self {
            user_id: row.user_id.clone(),
            campaign_id: row.campaign_id.clone(),
            day: row.stat_date,
            missing,
        }
    }
}

/// Totals of one backfill batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Legacy rows read.
    pub processed: u64,
    /// Rows copied (or, in a dry run, that would be).
    pub copied: u64,
    /// Rows all zero or already present.
    pub skipped: u64,
    /// Rows reported instead of copied.
    pub ambiguous: u64,
    /// The key of the last row read: the checkpoint. `None` when there was nothing left.
    pub last_key: Option<(String, NaiveDate)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(counts: [Option<i64>; LEGACY_COLUMN_COUNT]) -> LegacyRow {
        LegacyRow {
            campaign_id: "c".into(),
            user_id: "u".into(),
            stat_date: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            counts,
        }
    }

    #[test]
    fn copies_only_what_the_new_storage_lacks() {
        let legacy = row([Some(10), Some(4), Some(3), Some(1), Some(0)]);
        let empty = RowContext::default();
        assert_eq!(classify(&legacy, &empty), Verdict::Copy([10, 4, 3, 1, 0]));
        // Dual-written events of that day are already in the new storage.
        let partly = RowContext {
            in_new: [6, 4, 0, 0, 0],
            ..RowContext::default()
        };
        assert_eq!(classify(&legacy, &partly), Verdict::Copy([4, 0, 3, 1, 0]));
        let all = RowContext {
            in_new: [10, 4, 3, 1, 0],
            ..RowContext::default()
        };
        assert_eq!(classify(&legacy, &all), Verdict::AlreadyPresent);
        assert_eq!(classify(&row([Some(0); 5]), &empty), Verdict::AllZero);
        // A big campaign's day is an aggregate, copied whole.
        let huge = row([Some(5_000_000), Some(0), Some(0), Some(0), Some(0)]);
        assert_eq!(
            classify(&huge, &empty),
            Verdict::Copy([5_000_000, 0, 0, 0, 0])
        );
    }

    #[test]
    fn reports_rows_that_look_wrong() {
        let empty = RowContext::default();
        for (counts, reason) in [
            ([Some(1), None, Some(0), Some(0), Some(0)], "opened is NULL"),
            (
                [Some(-1), Some(0), Some(0), Some(0), Some(0)],
                "sent is negative",
            ),
            (
                [Some(0), Some(0), Some(1), Some(2), Some(0)],
                "positive_replies (2) > replied (1)",
            ),
            (
                [Some(3_000_000_000), Some(0), Some(0), Some(0), Some(0)],
                "more than a legacy int column holds",
            ),
        ] {
            match classify(&row(counts), &empty) {
                Verdict::Ambiguous(why) => assert!(why.detail.contains(reason), "{why:?}"),
                other => panic!("{counts:?}: {other:?}"),
            }
        }
        // Replies after the day of the sends are normal.
        assert!(matches!(
            classify(&row([Some(0), Some(0), Some(5), Some(1), Some(0)]), &empty),
            Verdict::Copy(_)
        ));
        let shared = RowContext {
            several_users: true,
            ..RowContext::default()
        };
        assert!(matches!(
            classify(&row([Some(1), Some(0), Some(0), Some(0), Some(0)]), &shared),
            Verdict::Ambiguous(_)
        ));
        let claimed = RowContext {
            owner: Some("other".into()),
            ..RowContext::default()
        };
        assert!(matches!(
            classify(
                &row([Some(1), Some(0), Some(0), Some(0), Some(0)]),
                &claimed
            ),
            Verdict::Ambiguous(_)
        ));
        let ahead = RowContext {
            in_new: [2, 0, 0, 0, 0],
            ..RowContext::default()
        };
        assert!(matches!(
            classify(&row([Some(1), Some(0), Some(0), Some(0), Some(0)]), &ahead),
            Verdict::Ambiguous(_)
        ));
    }
}

/// A legacy row read with its context, as the store hands it over.
#[derive(Debug, Clone)]
pub struct ReadRow {
    pub row: LegacyRow,
    pub context: RowContext,
}

/// What to do with one batch of legacy rows.
#[derive(Debug, Default)]
pub struct BatchPlan {
    /// Events to add to the new storage (one per missing count).
    pub copies: Vec<RollupCopy>,
    /// Rows reported instead of copied.
    pub issues: Vec<super::RunIssue>,
    pub outcome: BatchOutcome,
}

/// Plans one batch: classifies each row; what is missing from the new storage becomes a
/// rollup copy. A row that looks wrong is reported; if the operator resolved its key as COPY
/// before, what it lacks is copied as well.
pub fn plan_batch(rows: Vec<ReadRow>) -> BatchPlan {
    let mut plan = BatchPlan::default();
    for ReadRow { row, context } in rows {
        plan.outcome.processed += 1;
        plan.outcome.last_key = Some((row.campaign_id.clone(), row.stat_date));
        let verdict = match classify(&row, &context) {
            Verdict::Copy(missing) => match valid_ids(&row) {
                Ok(()) => Verdict::Copy(missing),
                Err(ambiguity) => Verdict::Ambiguous(ambiguity),
            },
            verdict => verdict,
        };
        match verdict {
            Verdict::AllZero | Verdict::AlreadyPresent => plan.outcome.skipped += 1,
            Verdict::Copy(missing) => {
                plan.outcome.copied += 1;
                plan.copies.push(RollupCopy::of(&row, missing));
            }
            Verdict::Ambiguous(ambiguity) => {
                plan.outcome.ambiguous += 1;
                if context.resolution == Some(Resolution::Copy)
                    && let Ok(Some(missing)) = copy_on_resolution(&row, &context)
                {
                    plan.copies.push(RollupCopy::of(&row, missing));
                }
                plan.issues.push(super::RunIssue::reported(&row, ambiguity));
            }
        }
    }
    plan
}

/// What one COPY or SKIP resolution does.
#[derive(Debug, Default)]
pub struct ResolutionPlan {
    /// The `(campaign, day)` keys resolved.
    pub keys: Vec<(String, NaiveDate)>,
    /// What COPY adds to the new storage.
    pub copies: Vec<RollupCopy>,
}

/// Plans resolving the unresolved ambiguous `rows` (already filtered) as `resolution`. COPY is
/// refused as a whole when any row cannot be copied.
pub fn plan_resolution(
    resolution: Resolution,
    rows: Vec<ReadRow>,
) -> Result<ResolutionPlan, ResolveRefused> {
    let mut plan = ResolutionPlan::default();
    let mut refused: Option<ResolveRefused> = None;
    for ReadRow { row, context } in rows {
        if resolution == Resolution::Copy {
            match copy_on_resolution(&row, &context) {
                Ok(Some(missing)) => plan.copies.push(RollupCopy::of(&row, missing)),
                Ok(None) => {}
                Err(why) => {
                    let refusal = refused.get_or_insert_with(|| ResolveRefused {
                        count: 0,
                        campaign_id: row.campaign_id.clone(),
                        day: row.stat_date,
                        why: why.detail,
                    });
                    refusal.count += 1;
                }
            }
        }
        plan.keys.push((row.campaign_id, row.stat_date));
    }
    match refused {
        Some(refusal) => Err(refusal),
        None => Ok(plan),
    }
}
