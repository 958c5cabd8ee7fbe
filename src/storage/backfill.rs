//! The backfill's SQL: a batch copied with set-based statements inside the database.
//!
//! A batch is a range of legacy keys `(campaign_id, stat_date)`: after the run's checkpoint,
//! up to and including the `batch_size`-th key. Most legacy rows are all zeros and most of
//! the rest are plainly right, so the database itself sorts the range's rows three ways:
//!
//! * **zero**: every count is 0. Skipped.
//! * **clean**: no count NULL, negative or beyond an `int`; no more positive replies than
//!   replies; the campaign under one user in legacy and owned by no one else in the new
//!   storage; the new storage holding no more than legacy; ids of printable ASCII. What the
//!   rollups lack is added by `INSERT … SELECT` (the all-users rollup, the owners, the
//!   campaign rollups), never leaving the database.
//! * **the rest** (a handful): read into the service and judged by the backfill's rules
//!   ([`crate::migration::backfill::plan_batch`]), which report them or copy them as an
//!   operator's resolution says.
//!
//! The clean predicate is stricter than the rules (a row it lets through is one the rules
//! copy), so a row either is copied here, or is judged by the rules: the test suite runs
//! every backfill test through this path on both backends.

/// The batch's key range: after `($1, $2)`, up to and including `($3, $4)`. The bounds on
/// `campaign_id` alone say nothing new, but let the planner use them (an index range on the
/// campaign, and a row estimate of one batch instead of a third of the table, which made
/// PostgreSQL hash-join the whole rollup table for every batch).
const RANGE: &str = "l.campaign_id BETWEEN $1 AND $3 \
    AND (l.campaign_id, l.stat_date) > ($1, $2) AND (l.campaign_id, l.stat_date) <= ($3, $4)";

/// Each legacy row of the range with what the new storage holds for it and the campaign's
/// owner.
const SOURCE: &str = " FROM campaign_daily_stat_entries l \
    LEFT JOIN campaign_day_totals r \
    ON r.user_id = l.user_id AND r.campaign_id = l.campaign_id AND r.day = l.stat_date \
    LEFT JOIN campaigns c ON c.campaign_id = l.campaign_id";

/// Every count is 0 (a NULL is not). A test of the legacy row alone: the planner applies it
/// while scanning the range, so the nine rows in ten that are zero never reach the joins.
const ZERO: &str = "(COALESCE(l.sent, -1) = 0 AND COALESCE(l.opened, -1) = 0 \
    AND COALESCE(l.replied, -1) = 0 AND COALESCE(l.positive_replies, -1) = 0 \
    AND COALESCE(l.bounced, -1) = 0)";

/// The new storage lacks some of the row's counts.
const MISSING: &str = "(COALESCE(r.sent, 0) < l.sent OR COALESCE(r.opened, 0) < l.opened \
    OR COALESCE(r.replied, 0) < l.replied \
    OR COALESCE(r.positive_replies, 0) < l.positive_replies \
    OR COALESCE(r.bounced, 0) < l.bounced)";

/// What the rollups lack, named as the rollup columns (legacy has no clicks).
const LACKING: &str = "l.sent - COALESCE(r.sent, 0) AS sent, \
    l.opened - COALESCE(r.opened, 0) AS opened, 0 AS clicked, \
    l.replied - COALESCE(r.replied, 0) AS replied, \
    l.positive_replies - COALESCE(r.positive_replies, 0) AS positive_replies, \
    l.bounced - COALESCE(r.bounced, 0) AS bounced";

/// How the copy's statements are put together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyStatements {
    /// One statement whose parts (data-modifying `WITH` clauses) share one snapshot and one
    /// set of rows, so that the all-users rollup and the campaign rollups grow by exactly the
    /// same rows even while other transactions commit (PostgreSQL).
    One,
    /// One statement per table, in an order that keeps their rows the same (SQLite: its one
    /// writer lets nothing else commit in between).
    PerTable,
}

/// The statements of one batch, for one backend.
#[derive(Debug, Clone)]
pub(super) struct BackfillSql {
    /// `($1, $2)`, `$3` = batch size − 1: the batch's last key when the batch is full.
    pub end_of_full_batch: String,
    /// `($1, $2)`: the last key of all, when fewer than a batch remain.
    pub last_key: String,
    /// The range's rows; of them, the non-zero rows; of those, the clean rows; of those, the
    /// clean rows to copy.
    pub counts: String,
    /// Copies the clean rows: adds them to the all-users rollup's backfill stripe, claims
    /// their campaigns for their legacy user where no one owns them, and adds them to the
    /// campaign rollups and to those rows' backfilled part. Run in order.
    pub copy: Vec<String>,
    /// The rest, as the backfill's rules read rows (`BACKFILL_COLUMNS`).
    pub others: String,
    /// The range's campaigns that appear under several users in legacy (`$1`, `$2`: the
    /// range's first and last campaign).
    pub several_users: String,
}

impl BackfillSql {
    /// The statements for a backend whose SQL says "both ids are 1 to 128 printable ASCII
    /// characters" as `plain_ids` (over the legacy row `l`), and "the legacy row's campaign
    /// is not in the JSON array of strings `$5`" as `not_listed`. (`$5` holds the range's
    /// campaigns under several users, read once per batch with [`Self::several_users`].)
    pub fn new(plain_ids: &str, not_listed: &str, statements: CopyStatements) -> Self {
        // Long because it is the text of every statement of a batch: they share the range
        // and the "clean" predicate, and are read against each other, so they stay together.
        // Every campaign of the range lies between the range's first and last campaign:
        // one index range of about a batch's rows.
        let several_users = "SELECT o.campaign_id FROM campaign_daily_stat_entries o \
             WHERE o.campaign_id BETWEEN $1 AND $2 \
             GROUP BY o.campaign_id HAVING MIN(o.user_id) <> MAX(o.user_id)"
            .to_owned();
        // A CASE, so that the dearer tests (patterns, the subquery) run only on the rows the
        // cheap ones let through: the planner orders the parts of a plain AND by its own cost
        // estimates, and tested the pattern on every zero row first.
        let clean = format!(
            "(CASE WHEN l.sent IS NOT NULL AND l.opened IS NOT NULL AND l.replied IS NOT NULL \
             AND l.positive_replies IS NOT NULL AND l.bounced IS NOT NULL \
             AND l.sent BETWEEN 0 AND 2147483647 AND l.opened BETWEEN 0 AND 2147483647 \
             AND l.replied BETWEEN 0 AND 2147483647 \
             AND l.positive_replies BETWEEN 0 AND l.replied \
             AND l.bounced BETWEEN 0 AND 2147483647 \
             AND (c.user_id IS NULL OR c.user_id = l.user_id) \
             AND COALESCE(r.sent, 0) <= l.sent AND COALESCE(r.opened, 0) <= l.opened \
             AND COALESCE(r.replied, 0) <= l.replied \
             AND COALESCE(r.positive_replies, 0) <= l.positive_replies \
             AND COALESCE(r.bounced, 0) <= l.bounced \
             THEN {plain_ids} AND {not_listed} ELSE false END)"
        );
        let copied = format!(
            "SELECT l.user_id, l.campaign_id, l.stat_date AS day, {LACKING} {SOURCE} \
             WHERE {RANGE} AND NOT {ZERO} AND {MISSING} AND {clean}"
        );
        let columns = crate::domain::rollup_columns();
        let grows = super::batch::rollup_grows();
        let all_days = format!(
            "INSERT INTO all_day_totals AS t (day, stripe, {columns}) \
             SELECT day, {stripe}, SUM(sent), SUM(opened), 0, SUM(replied), \
             SUM(positive_replies), SUM(bounced) FROM copied WHERE true GROUP BY day \
             ON CONFLICT (day, stripe){grows}",
            stripe = super::batch::BACKFILL_STRIPE,
        );
        let claims = "INSERT INTO campaigns (campaign_id, user_id) \
             SELECT DISTINCT campaign_id, user_id FROM copied WHERE true \
             ON CONFLICT (campaign_id) DO NOTHING";
        // What was copied is also remembered in the row as its backfilled part, for rollup
        // repair.
        let campaign_days = format!(
            "INSERT INTO campaign_day_totals AS t (user_id, campaign_id, day, {columns}, {}) \
             SELECT user_id, campaign_id, day, {columns}, {columns} FROM copied WHERE true \
             ON CONFLICT (user_id, campaign_id, day){}",
            super::batch::backfilled_columns(),
            super::batch::copy_grows(),
        );
        let copy = match statements {
            CopyStatements::One => vec![format!(
                "WITH copied AS MATERIALIZED ({copied}), \
                 days AS ({all_days} RETURNING 1), claims AS ({claims} RETURNING 1) \
                 {campaign_days}"
            )],
            // Each statement reads the rows anew: the all-users rollup and the owners first,
            // as the campaign rollups, once grown, no longer lack them.
            CopyStatements::PerTable => [all_days, claims.to_owned(), campaign_days]
                .into_iter()
                .map(|statement| format!("WITH copied AS ({copied}) {statement}"))
                .collect(),
        };
        Self {
            end_of_full_batch: "SELECT campaign_id, stat_date FROM campaign_daily_stat_entries \
                WHERE (campaign_id, stat_date) > ($1, $2) ORDER BY campaign_id, stat_date \
                LIMIT 1 OFFSET $3"
                .to_owned(),
            last_key: "SELECT campaign_id, stat_date FROM campaign_daily_stat_entries \
                WHERE (campaign_id, stat_date) > ($1, $2) \
                ORDER BY campaign_id DESC, stat_date DESC LIMIT 1"
                .to_owned(),
            counts: format!(
                "SELECT (SELECT COUNT(*) FROM campaign_daily_stat_entries l WHERE {RANGE}), \
                 COUNT(*), COALESCE(SUM(CASE WHEN {clean} THEN 1 ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN {clean} AND {MISSING} THEN 1 ELSE 0 END), 0) \
                 {SOURCE} WHERE {RANGE} AND NOT {ZERO}"
            ),
            copy,
            // `clean` is never NULL (each count is tested for NULL before it is compared), so
            // `NOT clean` is exactly the rows the statements above leave out.
            others: format!(
                "{}{} LEFT JOIN campaigns c ON c.campaign_id = l.campaign_id \
                 WHERE {RANGE} AND NOT {ZERO} AND NOT {clean} \
                 ORDER BY l.campaign_id, l.stat_date",
                super::batch::BACKFILL_COLUMNS,
                super::batch::BACKFILL_SOURCE,
            ),
            several_users,
        }
    }
}
