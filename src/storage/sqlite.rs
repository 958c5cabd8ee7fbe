//! The embedded backend: one SQLite file in WAL mode.
//!
//! Writes go through a pool of one connection, so that they queue in the service instead of
//! spinning on SQLite's file lock; reads use a pool of their own and never wait for writers.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use chrono::NaiveDate;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use super::{EventStore, PoolOptions, RecordOutcome, StorageError, batch};
use crate::domain::{CampaignId, DateRange, Event, Metrics, Scope, UserId};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// The SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating it if missing) the database file named by `url`, e.g.
    /// `sqlite://campaign-stats.db`.
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, StorageError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StorageError::Config(format!("invalid SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged write survives a power cut, not only a crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.clone())
            .await?;
        // An in-memory database lives in one connection: readers must share it.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let reader = if in_memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(options.max_connections.clamp(1, 8))
                .acquire_timeout(options.acquire_timeout)
                .connect_with(connect)
                .await?
        };
        Ok(Self { writer, reader })
    }
}

/// Most bound values in one statement (SQLite allows 32,766).
const MAX_BINDS_PER_STATEMENT: usize = 32_000;

/// How many rows of `binds_per_row` values fit one statement.
fn rows_per_statement(binds_per_row: usize) -> usize {
    MAX_BINDS_PER_STATEMENT / binds_per_row
}

/// Appends ` AND <column> IN (?, ?, …)` for `values`.
fn push_in_list<'a>(
    query: &mut QueryBuilder<Sqlite>,
    column: &str,
    values: impl IntoIterator<Item = &'a str>,
) {
    query.push(format_args!(" AND {column} IN ("));
    let mut list = query.separated(", ");
    for value in values {
        list.push_bind(value.to_owned());
    }
    list.push_unseparated(")");
}

impl EventStore for SqliteStore {
    async fn migrate(&self) -> Result<(), StorageError> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    async fn record_events(&self, events: &[Event]) -> Result<RecordOutcome, StorageError> {
        let mut tx = self.writer.begin().await?;

        let claims = batch::campaign_claims(events);
        for chunk in claims.chunks(rows_per_statement(2)) {
            let mut insert =
                QueryBuilder::<Sqlite>::new("INSERT INTO campaigns (campaign_id, user_id) ");
            insert.push_values(chunk, |mut row, (campaign, user)| {
                row.push_bind(campaign.as_str()).push_bind(user.as_str());
            });
            insert.push(" ON CONFLICT (campaign_id) DO NOTHING");
            insert.build().execute(&mut *tx).await?;
        }
        let mut owners = HashMap::with_capacity(claims.len());
        for chunk in claims.chunks(rows_per_statement(1)) {
            let mut select = QueryBuilder::<Sqlite>::new(
                "SELECT campaign_id, user_id FROM campaigns WHERE true",
            );
            push_in_list(
                &mut select,
                "campaign_id",
                chunk.iter().map(|(c, _)| c.as_str()),
            );
            let rows: Vec<(String, String)> = select.build_query_as().fetch_all(&mut *tx).await?;
            owners.extend(rows);
        }
        batch::check_owners(events, &owners)?;

        let mut fresh = HashSet::new();
        for chunk in batch::idempotency_keys(events).chunks(rows_per_statement(2)) {
            let mut insert = QueryBuilder::<Sqlite>::new(
                "INSERT INTO idempotency_keys (user_id, idempotency_key) ",
            );
            insert.push_values(chunk, |mut row, (user, key)| {
                row.push_bind(user.as_str()).push_bind(*key);
            });
            insert.push(" ON CONFLICT DO NOTHING RETURNING user_id, idempotency_key");
            let inserted: Vec<(String, String)> =
                insert.build_query_as().fetch_all(&mut *tx).await?;
            fresh.extend(inserted);
        }
        let (accepted, outcome) = batch::accepted_events(events, fresh);

        for chunk in accepted.chunks(rows_per_statement(7)) {
            let mut insert = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (user_id, campaign_id, event_type, count, occurred_at, \
                 email_account_id, idempotency_key) ",
            );
            insert.push_values(chunk, |mut row, event| {
                row.push_bind(event.user_id.as_str())
                    .push_bind(event.campaign_id.as_str())
                    .push_bind(event.event_type.code())
                    .push_bind(event.count)
                    .push_bind(event.occurred_at)
                    .push_bind(event.email_account_id.as_deref())
                    .push_bind(event.idempotency_key.as_deref());
            });
            insert.build().execute(&mut *tx).await?;
        }
        let deltas: Vec<_> = batch::rollup_deltas(&accepted).into_iter().collect();
        for chunk in deltas.chunks(rows_per_statement(5)) {
            let mut upsert = QueryBuilder::<Sqlite>::new(
                "INSERT INTO daily_rollups (user_id, campaign_id, day, event_type, total) ",
            );
            upsert.push_values(
                chunk,
                |mut row, ((user, campaign, day, event_type), delta)| {
                    row.push_bind(*user)
                        .push_bind(*campaign)
                        .push_bind(*day)
                        .push_bind(*event_type)
                        .push_bind(*delta);
                },
            );
            upsert.push(
                " ON CONFLICT (user_id, campaign_id, day, event_type) \
                 DO UPDATE SET total = total + excluded.total",
            );
            upsert.build().execute(&mut *tx).await?;
        }

        tx.commit().await?;
        Ok(outcome)
    }

    async fn campaign_totals(
        &self,
        user: &UserId,
        campaigns: &[CampaignId],
        range: DateRange,
    ) -> Result<HashMap<CampaignId, Metrics>, StorageError> {
        if campaigns.is_empty() {
            return Ok(HashMap::new());
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT campaign_id, event_type, SUM(total) FROM daily_rollups WHERE user_id = ",
        );
        query.push_bind(user.as_str().to_owned());
        query.push(" AND day BETWEEN ").push_bind(range.start);
        query.push(" AND ").push_bind(range.end);
        push_in_list(
            &mut query,
            "campaign_id",
            campaigns.iter().map(CampaignId::as_str),
        );
        query.push(" GROUP BY campaign_id, event_type");
        let rows: Vec<(String, i16, i64)> = query.build_query_as().fetch_all(&self.reader).await?;
        Ok(batch::fold_campaign_rows(rows))
    }

    async fn daily_totals(
        &self,
        scope: &Scope,
        range: DateRange,
    ) -> Result<Vec<(NaiveDate, Metrics)>, StorageError> {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT day, event_type, SUM(total) FROM daily_rollups WHERE day BETWEEN ",
        );
        query
            .push_bind(range.start)
            .push(" AND ")
            .push_bind(range.end);
        if let Some(user) = &scope.user {
            query
                .push(" AND user_id = ")
                .push_bind(user.as_str().to_owned());
        }
        if !scope.campaigns.is_empty() {
            push_in_list(
                &mut query,
                "campaign_id",
                scope.campaigns.iter().map(CampaignId::as_str),
            );
        }
        query.push(" GROUP BY day, event_type ORDER BY day");
        let rows: Vec<(NaiveDate, i16, i64)> =
            query.build_query_as().fetch_all(&self.reader).await?;
        Ok(batch::fold_daily_rows(rows))
    }

    async fn ping(&self) -> Result<(), StorageError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}
