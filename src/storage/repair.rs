//! Rollup repair, shared by both backends: read a range's rollups and their sources, let the
//! domain's rule say which rows are wrong, and rewrite them (and the all-users days) when
//! asked. The caller owns the transaction and whatever keeps writes out while it runs.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use sqlx::{Encode, Executor, FromRow, IntoArguments, Type};

use super::{RepairOutcome, StorageError};
use crate::domain::{DateRange, EVENT_TYPES, EventTotals, EventType, RollupKey, rollup_fixes};

/// A campaign row: key and the six totals in [`EVENT_TYPES`] order.
type TotalsRow = (String, String, NaiveDate, i64, i64, i64, i64, i64, i64);
/// A campaign row: key, its six totals, and the six of its backfilled part.
type StoredRow = (
    String,
    String,
    NaiveDate,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);
/// An all-users day and its six totals.
type DayRow = (NaiveDate, i64, i64, i64, i64, i64, i64);

fn totals(values: [i64; 6]) -> Result<EventTotals, StorageError> {
    let mut totals = EventTotals::default();
    for (event_type, value) in EventType::ALL.into_iter().zip(values) {
        let value = u64::try_from(value)
            .map_err(|_| StorageError::Corrupt(format!("a negative rollup total: {value}")))?;
        totals
            .add(event_type, value)
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
    }
    Ok(totals)
}

fn values(totals: &EventTotals) -> [i64; 6] {
    EventType::ALL.map(|t| i64::try_from(totals.get(t)).unwrap_or(i64::MAX))
}

fn keyed(rows: Vec<TotalsRow>) -> Result<BTreeMap<RollupKey, EventTotals>, StorageError> {
    rows.into_iter()
        .map(|(user, campaign, day, a, b, c, d, e, f)| {
            Ok(((user, campaign, day), totals([a, b, c, d, e, f])?))
        })
        .collect()
}

/// Repairs the rollups of `range` inside `tx`; `raw_day` is the backend's expression for the
/// UTC day of an event's `occurred_at`.
pub(super) async fn repair_rollups<DB>(
    tx: &mut DB::Connection,
    range: DateRange,
    apply: bool,
    raw_day: &str,
) -> Result<RepairOutcome, StorageError>
where
    DB: sqlx::Database,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> NaiveDate: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'r> TotalsRow: FromRow<'r, DB::Row>,
    for<'r> StoredRow: FromRow<'r, DB::Row>,
    for<'r> DayRow: FromRow<'r, DB::Row>,
{
    let columns = crate::domain::rollup_columns();
    let sums: Vec<String> = EVENT_TYPES
        .iter()
        .map(|t| {
            format!(
                "SUM(CASE WHEN event_type = {} THEN count ELSE 0 END)",
                t.code
            )
        })
        .collect();
    let raw_sql = format!(
        "SELECT user_id, campaign_id, {raw_day} AS day, {} FROM events \
         WHERE {raw_day} BETWEEN $1 AND $2 GROUP BY user_id, campaign_id, {raw_day}",
        sums.join(", ")
    );
    // Each row once: what it holds, and the part of it backfills copied.
    let rows: Vec<StoredRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT user_id, campaign_id, day, {columns}, {} FROM campaign_day_totals \
         WHERE day BETWEEN $1 AND $2",
        super::batch::backfilled_part()
    )))
    .bind(range.start)
    .bind(range.end)
    .fetch_all(&mut *tx)
    .await?;
    let mut stored = BTreeMap::new();
    let mut backfilled = BTreeMap::new();
    for (user, campaign, day, a, b, c, d, e, f, ba, bb, bc, bd, be, bf) in rows {
        let key = (user, campaign, day);
        backfilled.insert(key.clone(), totals([ba, bb, bc, bd, be, bf])?);
        stored.insert(key, totals([a, b, c, d, e, f])?);
    }
    let raw_rows: Vec<TotalsRow> = sqlx::query_as(sqlx::AssertSqlSafe(raw_sql))
        .bind(range.start)
        .bind(range.end)
        .fetch_all(&mut *tx)
        .await?;
    let raw = keyed(raw_rows)?;
    let fixes = rollup_fixes(&stored, &raw, &backfilled)
        .map_err(|e| StorageError::Corrupt(e.to_string()))?;

    // Each day's all-users totals: the sum of its campaign rows once repaired.
    let mut repaired = stored.clone();
    for fix in &fixes {
        repaired.insert(fix.key.clone(), fix.expected);
    }
    let mut days: BTreeMap<NaiveDate, EventTotals> = BTreeMap::new();
    for ((_, _, day), totals) in &repaired {
        days.entry(*day)
            .or_default()
            .add_all(*totals)
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
    }
    let day_rows: Vec<DayRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT day, {} FROM all_day_totals WHERE day BETWEEN $1 AND $2 GROUP BY day",
        EVENT_TYPES
            .iter()
            // PostgreSQL sums BIGINT as NUMERIC: cast back.
            .map(|t| format!("CAST(SUM({}) AS BIGINT)", t.column))
            .collect::<Vec<_>>()
            .join(", ")
    )))
    .bind(range.start)
    .bind(range.end)
    .fetch_all(&mut *tx)
    .await?;
    let mut all_users: BTreeMap<NaiveDate, EventTotals> = BTreeMap::new();
    for (day, a, b, c, d, e, f) in day_rows {
        all_users.insert(day, totals([a, b, c, d, e, f])?);
    }
    // Days the all-users rollup has and no campaign row has: they should hold nothing.
    let no_events = EventTotals::default();
    let wrong_days: Vec<(NaiveDate, EventTotals)> = days
        .iter()
        .chain(
            all_users
                .keys()
                .filter(|d| !days.contains_key(d))
                .map(|d| (d, &no_events)),
        )
        .filter(|(day, expected)| all_users.get(day).copied().unwrap_or_default() != **expected)
        .map(|(day, expected)| (*day, *expected))
        .collect();

    if apply {
        let placeholders = (4..10)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let set = EVENT_TYPES
            .iter()
            .map(|t| format!("{0} = excluded.{0}", t.column))
            .collect::<Vec<_>>()
            .join(", ");
        let upsert = format!(
            "INSERT INTO campaign_day_totals (user_id, campaign_id, day, {columns}) \
             VALUES ($1, $2, $3, {placeholders}) \
             ON CONFLICT (user_id, campaign_id, day) DO UPDATE SET {set}"
        );
        for fix in &fixes {
            let (user, campaign, day) = fix.key.clone();
            let mut query = sqlx::query(sqlx::AssertSqlSafe(upsert.clone()))
                .bind(user)
                .bind(campaign)
                .bind(day);
            for value in values(&fix.expected) {
                query = query.bind(value);
            }
            query.execute(&mut *tx).await?;
        }
        let day_placeholders = (2..8)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let day_insert = format!(
            "INSERT INTO all_day_totals (day, stripe, {columns}) VALUES ($1, 0, {day_placeholders})"
        );
        for (day, expected) in &wrong_days {
            sqlx::query("DELETE FROM all_day_totals WHERE day = $1")
                .bind(*day)
                .execute(&mut *tx)
                .await?;
            let mut query = sqlx::query(sqlx::AssertSqlSafe(day_insert.clone())).bind(*day);
            for value in values(expected) {
                query = query.bind(value);
            }
            query.execute(&mut *tx).await?;
        }
    }
    Ok(RepairOutcome {
        checked: stored.len() as u64,
        all_users_days: wrong_days.len() as u64,
        fixes,
    })
}
