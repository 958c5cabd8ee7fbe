//! The production backend: PostgreSQL, with raw events partitioned by month and bulk writes
//! through `UNNEST` arrays (a handful of statements per batch, whatever its size).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{Connection, PgConnection, PgPool, Postgres, QueryBuilder, Row};
use tokio::sync::watch;

use super::backfill::{BackfillSql, CopyStatements};
use super::pg_copy;
use super::shared::{EditedMigration, Shared, Transitioned};
use super::{
    AdminStore, CutoverStore, Database, EventStore, OnBoth, PhaseStore, PoolOptions, PoolUse,
    Pruned, RepairOutcome, RetentionStore, RolloutStore, RunIssues, RunStore, StorageError,
    TableSize, batch, parse_phase, sql,
};
use crate::domain::{
    CampaignId, DateRange, Event, EventTotals, LEGACY_COLUMN_COUNT, Scope, StorageSource, UserId,
};
use crate::migration::ambiguous::{ResolutionRecord, ResolveOutcome, ResolveRequest};
use crate::migration::backfill::{BatchOutcome, LegacyRow, RollupCopy, plan_resolution};
use crate::migration::verify::VerifyOutcome;
use crate::migration::{Phase, PhaseState, Run, RunKind, RunState, Transition};
use crate::rollout::{AuditEntry, RolloutChange, RolloutSnapshot};

static SCHEMA: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Migrations edited after they shipped (see [`EditedMigration`]): 20261121000002 no longer
/// indexes a legacy table it did not create.
const EDITED_MIGRATIONS: [EditedMigration; 1] = [EditedMigration {
    version: 20261121000002,
    shipped_checksum: "84be7f9b0e14047be920e6e1767ea2e43535fcbd76ddc09b7a7980436e262732e82a15f6dcd34e501ab4790e5b878e51",
}];

/// Selects whether the table `$1` exists.
const TABLE_EXISTS: &str = "SELECT to_regclass($1) IS NOT NULL";

/// How many months ahead of the current one `migrate` creates partitions for.
const PARTITIONS_AHEAD: u32 = 2;

/// The PostgreSQL backend.
#[derive(Debug)]
pub struct PostgresStore {
    pool: PgPool,
    statement_timeout: std::time::Duration,
    /// Months (their first day) whose event partition this process has made sure of.
    partitions: Mutex<HashSet<NaiveDate>>,
    /// Campaign owners seen committed.
    owners: batch::OwnerCache,
}

impl PostgresStore {
    /// Connects to the database named by `url`, e.g. `postgres://user@host:5432/db`.
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, StorageError> {
        let connect: PgConnectOptions = url
            .parse()
            .map_err(|e| StorageError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        let database_port = connect.get_port();
        let connect = connect.application_name("campaign-stats").options([
            // The database ends a statement (a lock wait included) that runs longer, and
            // the transaction with it.
            (
                "statement_timeout",
                format!("{}ms", options.statement_timeout.as_millis().max(1)),
            ),
            // `CREATE … IF NOT EXISTS` of a schema that is up to date says "already
            // exists, skipping" at every start: not news for an operator.
            ("client_min_messages", "warning".to_owned()),
        ]);
        // One connection first: a pool that cannot connect only says it timed out, where
        // the operator needs the cause ("connection refused", "database … does not exist").
        let (host, port, database) = (
            connect.get_host().to_owned(),
            database_port,
            connect.get_database().unwrap_or("").to_owned(),
        );
        let first = tokio::time::timeout(
            options.acquire_timeout,
            PgConnection::connect_with(&connect),
        )
        .await
        .map_err(|_| {
            StorageError::Unreachable(format!(
                "PostgreSQL at {host}:{port} did not answer within {:?}",
                options.acquire_timeout
            ))
        })?
        .map_err(|e| {
            StorageError::Unreachable(format!(
                "cannot connect to PostgreSQL database {database:?} at {host}:{port}: {}",
                first_line(&e)
            ))
        })?;
        first.close().await.ok();
        let pool = options
            .sqlx::<Postgres>()
            .after_connect(move |connection, _| {
                Box::pin(async move { disable_nagle(connection, database_port).await })
            })
            .connect_with(connect)
            .await?;
        Ok(Self {
            pool,
            statement_timeout: options.statement_timeout,
            partitions: Mutex::new(HashSet::new()),
            owners: batch::OwnerCache::default(),
        })
    }

    /// Makes sure the monthly partitions holding `months` exist, creating the missing ones.
    ///
    /// Best effort by design: a partition that cannot be created is logged, and its rows land
    /// in the default partition, so a write never fails for want of a partition.
    async fn ensure_partitions(&self, months: impl IntoIterator<Item = NaiveDate>) {
        let missing: BTreeSet<NaiveDate> = {
            let known = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            months.into_iter().filter(|m| !known.contains(m)).collect()
        };
        for month in missing {
            if let Err(error) = self.create_partition(month).await {
                tracing::warn!(%month, error = %error, "could not create the events partition; rows go to the default partition");
            }
            // Remembered either way: a failing month is not retried on every write.
            self.partitions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(month);
        }
    }

    async fn create_partition(&self, month: NaiveDate) -> Result<(), sqlx::Error> {
        let next = month + Months::new(1);
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS events_p{:04}_{:02} PARTITION OF events \
             FOR VALUES FROM ('{month} 00:00:00+00') TO ('{next} 00:00:00+00')",
            month.year(),
            month.month()
        );
        let mut tx = self.pool.begin().await?;
        // Replicas racing to create the same partition take turns.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('campaign_stats.events_partitions'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }
}

/// Turns Nagle's algorithm off on a new connection's socket. sqlx 0.9.0 leaves it on
/// (launchbadge/sqlx#4335; fixed upstream by #4336, not yet released): a message that ends in
/// a partial TCP segment behind unacknowledged data then waits for the server's delayed ACK,
/// 40 ms on Linux, and every large write batch paid that. The socket is found among the
/// process's descriptors by the local port the server sees and the server's port.
pub async fn disable_nagle(
    connection: &mut sqlx::PgConnection,
    database_port: u16,
) -> Result<(), sqlx::Error> {
    let local_port: Option<i32> = sqlx::query_scalar("SELECT inet_client_port()")
        .fetch_one(&mut *connection)
        .await?;
    // None: a Unix socket, which has no Nagle's algorithm.
    if let Some(local_port) = local_port.and_then(|p| u16::try_from(p).ok()) {
        set_nodelay_on(local_port, database_port);
    }
    Ok(())
}

/// Sets `TCP_NODELAY` on this process's TCP socket from `local_port` to `peer_port` (Linux:
/// found through `/proc/self/fd`; elsewhere nothing is done).
fn set_nodelay_on(local_port: u16, peer_port: u16) {
    use std::os::fd::{BorrowedFd, RawFd};
    let Ok(descriptors) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let port = |address: std::io::Result<socket2::SockAddr>| {
        address.ok().and_then(|a| a.as_socket()).map(|a| a.port())
    };
    for entry in descriptors.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the calls below. One closed meanwhile
        // makes them fail (EBADF); one reused for another file fails them too or is not a
        // socket between these two ports, and is left alone.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        if port(socket.local_addr()) == Some(local_port)
            && port(socket.peer_addr()) == Some(peer_port)
        {
            if let Err(error) = socket.set_tcp_nodelay(true) {
                tracing::debug!(%error, "could not turn Nagle's algorithm off");
            }
            return;
        }
    }
}

/// The sums of a read, in [`batch::Sums`] order, over [`batch::LEGACY_READ_ROWS`] or the
/// rollups (grouped by the caller); `sum_bigint` adds in BIGINT (see its migration).
const SUMS: &str = "sum_bigint(sent), sum_bigint(opened), sum_bigint(replied), \
    sum_bigint(positive_replies), sum_bigint(bounced), sum_bigint(clicked)";

/// One field of every event, as an array parameter for `UNNEST`.
fn column<'a, T>(events: &[&'a Event], field: impl Fn(&'a Event) -> T) -> Vec<T> {
    events.iter().map(|e| field(e)).collect()
}

/// Batches of concurrent backfill runs (say, on two replicas) and resolutions take turns: each
/// then sees what the other copied, and nothing is copied twice.
async fn lock_backfill(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('campaign_stats.backfill'))")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The set-based backfill's statements: one writable `WITH` statement copies a batch. (The id
/// test is a length and a negated class: `^[ -~]{1,128}$` costs PostgreSQL twenty times more
/// per row.)
fn backfill_sql() -> &'static BackfillSql {
    static SQL: std::sync::OnceLock<BackfillSql> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        BackfillSql::new(
            "octet_length(l.user_id) BETWEEN 1 AND 128 AND l.user_id !~ '[^ -~]' \
             AND octet_length(l.campaign_id) BETWEEN 1 AND 128 AND l.campaign_id !~ '[^ -~]'",
            "l.campaign_id NOT IN (SELECT jsonb_array_elements_text($5::jsonb))",
            CopyStatements::One,
        )
    })
}

/// Adds legacy history (a backfill's or a resolution's `copies`) to the rollups, and claims
/// each campaign for its legacy user where no one owns it yet.
async fn copy_into_rollups(
    tx: &mut sqlx::PgConnection,
    copies: &[RollupCopy],
) -> Result<(), sqlx::Error> {
    if copies.is_empty() {
        return Ok(());
    }
    let (campaigns, owners): (Vec<&str>, Vec<&str>) =
        batch::copy_claims(copies).into_iter().unzip();
    sqlx::query(
        "INSERT INTO campaigns (campaign_id, user_id) \
         SELECT * FROM UNNEST($1::text[], $2::text[]) ON CONFLICT (campaign_id) DO NOTHING",
    )
    .bind(&campaigns)
    .bind(&owners)
    .execute(&mut *tx)
    .await?;
    let deltas = batch::copy_deltas(copies);
    // Copies take turns (see `lock_backfill`): they share one stripe, so a day's history
    // stays in one row.
    add_copies_to_rollups(tx, &deltas, batch::BACKFILL_STRIPE).await
}

/// The upsert growing the campaign rollups from arrays `$first` (users), `$first + 1`
/// (campaigns), `$first + 2` (days) and six arrays of totals (see [`bind_campaign_days`]);
/// copied legacy history grows the rows' backfilled part by as much.
fn campaign_days_upsert(first: usize, origin: batch::Origin) -> String {
    let totals: Vec<String> = (3..9).map(|i| format!("${}::int8[]", first + i)).collect();
    let (backfilled, values, grows) = match origin {
        batch::Origin::Events => (String::new(), "*", batch::rollup_grows()),
        batch::Origin::Copied => (
            format!(", {}", batch::backfilled_columns()),
            "u, c, d, s, o, k, r, p, b, s, o, k, r, p, b",
            batch::copy_grows(),
        ),
    };
    format!(
        "INSERT INTO campaign_day_totals AS t (user_id, campaign_id, day, {}{backfilled}) \
         SELECT {values} FROM UNNEST(${first}::text[], ${}::text[], ${}::date[], {}) \
         AS x(u, c, d, s, o, k, r, p, b) ON CONFLICT (user_id, campaign_id, day){grows}",
        crate::domain::rollup_columns(),
        first + 1,
        first + 2,
        totals.join(", "),
    )
}

/// The upsert growing stripe `$first` of the all-users rollup from the days in `$first + 1`
/// and six arrays of totals (see [`bind_all_days`]).
fn all_days_upsert(first: usize) -> String {
    let totals: Vec<String> = (2..8).map(|i| format!("${}::int8[]", first + i)).collect();
    format!(
        "INSERT INTO all_day_totals AS t (day, stripe, {}) \
         SELECT d, ${first}, s, o, c, r, p, b FROM UNNEST(${}::date[], {}) \
         AS u(d, s, o, c, r, p, b) ON CONFLICT (day, stripe){}",
        crate::domain::rollup_columns(),
        first + 1,
        totals.join(", "),
        batch::rollup_grows()
    )
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// Binds the parameters of [`campaign_days_upsert`].
fn bind_campaign_days<'q>(
    query: PgQuery<'q>,
    deltas: &'q BTreeMap<batch::CampaignDayKey<'_>, batch::DayTotals>,
) -> PgQuery<'q> {
    let query = query
        .bind(deltas.keys().map(|k| k.0).collect::<Vec<_>>())
        .bind(deltas.keys().map(|k| k.1).collect::<Vec<_>>())
        .bind(deltas.keys().map(|k| k.2).collect::<Vec<_>>());
    (0..6).fold(query, |query, index| {
        query.bind(batch::DayTotals::column(deltas.iter(), index))
    })
}

/// Binds the parameters of [`all_days_upsert`].
fn bind_all_days<'q>(
    query: PgQuery<'q>,
    days: &'q BTreeMap<NaiveDate, batch::DayTotals>,
    stripe: i16,
) -> PgQuery<'q> {
    let query = query
        .bind(stripe)
        .bind(days.keys().copied().collect::<Vec<_>>());
    (0..6).fold(query, |query, index| {
        query.bind(batch::DayTotals::column(days.iter(), index))
    })
}

/// Grows the campaign rollups (and their backfilled part) by copied `deltas`, and `stripe` of
/// the all-users rollup by their sum per day.
async fn add_copies_to_rollups(
    tx: &mut sqlx::PgConnection,
    deltas: &BTreeMap<batch::CampaignDayKey<'_>, batch::DayTotals>,
    stripe: i16,
) -> Result<(), sqlx::Error> {
    if deltas.is_empty() {
        return Ok(());
    }
    let sql = statements();
    bind_campaign_days(
        sqlx::query(sqlx::AssertSqlSafe(&*sql.copied_campaign_days)),
        deltas,
    )
    .execute(&mut *tx)
    .await?;
    let days = batch::all_day_deltas(deltas);
    bind_all_days(
        sqlx::query(sqlx::AssertSqlSafe(&*sql.all_days)),
        &days,
        stripe,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The statements of a write, made once.
struct WriteStatements {
    /// Share-locks and reads the phase, claims campaigns, reads their owners and inserts the
    /// idempotency keys (see [`claim`]).
    claim: String,
    /// Applies a [`batch::BatchPlan`]: raw events, both rollups and the legacy rows, in one
    /// statement (see [`apply`]).
    apply: String,
    /// The same without the raw events, which a large batch sends by `COPY` first.
    apply_after_copy: String,
    /// The campaign rollups' upsert of copied legacy history (`$1`…`$9`).
    copied_campaign_days: String,
    /// The all-users rollup's upsert on its own (`$1`…`$8`).
    all_days: String,
}

fn statements() -> &'static WriteStatements {
    static SQL: std::sync::OnceLock<WriteStatements> = std::sync::OnceLock::new();
    SQL.get_or_init(|| WriteStatements {
        // The phase is read `FOR SHARE`: a transition (which updates the row) waits until
        // this write commits, and a write that starts after the transition waits for it and
        // then reads the new phase. So a write always commits in the phase it planned for.
        // Owners are the claims this statement made plus those stored before it began; one
        // claimed by a concurrent write in between is read again (see [`claim`]).
        claim: "WITH phase AS (SELECT phase FROM migration_state WHERE id = 1 FOR SHARE), \
            claimed AS (INSERT INTO campaigns (campaign_id, user_id) \
                SELECT t.campaign_id, COALESCE( \
                    (SELECT l.user_id FROM campaign_daily_stat_entries l \
                     WHERE l.campaign_id = t.campaign_id ORDER BY l.stat_date LIMIT 1), \
                    t.user_id) \
                FROM UNNEST($1::text[], $2::text[]) AS t(campaign_id, user_id) \
                ON CONFLICT (campaign_id) DO NOTHING RETURNING campaign_id, user_id), \
            fresh AS (INSERT INTO idempotency_keys (user_id, idempotency_key) \
                SELECT * FROM UNNEST($3::text[], $4::text[]) \
                ON CONFLICT DO NOTHING RETURNING user_id, idempotency_key) \
            SELECT 0::int2, phase, NULL::text FROM phase \
            UNION ALL SELECT 1::int2, campaign_id, user_id FROM claimed \
            UNION ALL SELECT 1::int2, campaign_id, user_id FROM campaigns \
                WHERE campaign_id = ANY($1) \
            UNION ALL SELECT 2::int2, user_id, idempotency_key FROM fresh"
            .to_owned(),
        apply: apply_statement(true),
        apply_after_copy: apply_statement(false),
        copied_campaign_days: campaign_days_upsert(1, batch::Origin::Copied),
        all_days: all_days_upsert(1),
    })
}

/// The statement applying a plan: the raw events (`$1`…`$7`, when `with_events`), the
/// campaign rollups, the all-users rollup, and the legacy rows, which it returns as written.
fn apply_statement(with_events: bool) -> String {
    let (events, first) = if with_events {
        (
            "new_events AS (INSERT INTO events (user_id, campaign_id, event_type, count, \
             occurred_at, email_account_id, idempotency_key) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int2[], $4::int4[], \
             $5::timestamptz[], $6::text[], $7::text[])), ",
            8,
        )
    } else {
        ("", 1)
    };
    let legacy: Vec<String> = [
        "text", "text", "date", "int8", "int8", "int8", "int8", "int8",
    ]
    .iter()
    .enumerate()
    .map(|(i, ty)| format!("${}::{ty}[]", first + 17 + i))
    .collect();
    format!(
        "WITH {events}campaign_days AS ({}), all_days AS ({}) \
         INSERT INTO campaign_daily_stat_entries AS l (campaign_id, user_id, stat_date, \
         sent, opened, replied, positive_replies, bounced, created_at, updated_at) \
         SELECT campaign_id, user_id, stat_date, sent, opened, replied, positive_replies, \
         bounced, now(), now() FROM UNNEST({}) \
         AS t(campaign_id, user_id, stat_date, sent, opened, replied, positive_replies, \
         bounced) \
         ON CONFLICT (campaign_id, stat_date) DO UPDATE SET \
         sent = COALESCE(l.sent, 0) + EXCLUDED.sent, \
         opened = COALESCE(l.opened, 0) + EXCLUDED.opened, \
         replied = COALESCE(l.replied, 0) + EXCLUDED.replied, \
         positive_replies = COALESCE(l.positive_replies, 0) + EXCLUDED.positive_replies, \
         bounced = COALESCE(l.bounced, 0) + EXCLUDED.bounced, \
         updated_at = now(){}",
        campaign_days_upsert(first, batch::Origin::Events),
        all_days_upsert(first + 9),
        legacy.join(", "),
        batch::legacy_counts_fit()
    )
}

/// Raw events from this many on go by binary `COPY` (see [`super::pg_copy`]): it takes two
/// more round trips than an insert inside the plan's statement, and saves more than those
/// only for large batches.
const COPY_FROM_EVENTS: usize = 256;

/// Runs a batch's [`batch::BatchClaims`]: the first statement of the write.
async fn claim(
    tx: &mut sqlx::PgConnection,
    claims: &batch::BatchClaims<'_>,
) -> Result<batch::ClaimsAnswer, StorageError> {
    let (campaigns, claimants): (Vec<&str>, Vec<&str>) = claims
        .claims
        .iter()
        .map(|(campaign, user)| (campaign.as_str(), user.as_str()))
        .unzip();
    let (key_users, keys): (Vec<&str>, Vec<&str>) = claims
        .keys
        .iter()
        .map(|(user, key)| (user.as_str(), *key))
        .unzip();
    let rows: Vec<(i16, String, Option<String>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(&*statements().claim))
            .bind(&campaigns)
            .bind(&claimants)
            .bind(&key_users)
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?;
    let mut phase = None;
    let mut owners = HashMap::with_capacity(campaigns.len());
    let mut fresh = HashSet::with_capacity(keys.len());
    for (kind, first, second) in rows {
        match (kind, second) {
            (1, Some(user)) => {
                owners.insert(first, user);
            }
            (2, Some(key)) => {
                fresh.insert((first, key));
            }
            _ => phase = Some(first),
        }
    }
    let phase = phase.ok_or_else(|| StorageError::Corrupt("no migration_state row".into()))?;
    let missing: Vec<&str> = campaigns
        .iter()
        .copied()
        .filter(|campaign| !owners.contains_key(*campaign))
        .collect();
    if !missing.is_empty() {
        // Claimed by a concurrent write that committed after this statement began.
        let read: Vec<(String, String)> = sqlx::query_as(
            "SELECT campaign_id, user_id FROM campaigns WHERE campaign_id = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(&mut *tx)
        .await?;
        owners.extend(read);
    }
    Ok(batch::ClaimsAnswer {
        targets: parse_phase(&phase)?.write_targets(),
        owners,
        fresh,
    })
}

/// Applies `plan` in one statement; refuses the batch with [`Refusal::LegacyOverflow`](super::Refusal::LegacyOverflow)
/// when a legacy count would pass its `int` column.
async fn apply(
    tx: &mut sqlx::PgConnection,
    events: &[Event],
    plan: &batch::BatchPlan<'_>,
) -> Result<(), StorageError> {
    let mut refused = batch::oversized_legacy_deltas(&plan.legacy);
    if refused.is_empty() {
        let new = &plan.new_events;
        let query = if new.len() >= COPY_FROM_EVENTS {
            let mut copy = tx.copy_in_raw(pg_copy::COPY_EVENTS).await?;
            copy.send(pg_copy::encode_events(new)).await?;
            copy.finish().await?;
            sqlx::query(sqlx::AssertSqlSafe(&*statements().apply_after_copy))
        } else {
            sqlx::query(sqlx::AssertSqlSafe(&*statements().apply))
                .bind(column(new, |e| e.user_id.as_str()))
                .bind(column(new, |e| e.campaign_id.as_str()))
                .bind(column(new, |e| e.event_type.code()))
                // Counts are at most 1,000,000, so they fit an int4.
                .bind(column(new, |e| e.count as i32))
                .bind(column(new, |e| e.occurred_at))
                .bind(column(new, |e| e.email_account_id.as_deref()))
                .bind(column(new, |e| e.idempotency_key.as_deref()))
        };
        let query = bind_campaign_days(query, &plan.campaign_days);
        let query = bind_all_days(query, &plan.all_days, plan.stripe);
        let legacy = &plan.legacy;
        let mut query = query
            .bind(legacy.keys().map(|k| k.0).collect::<Vec<_>>())
            .bind(legacy.values().map(|(user, _)| *user).collect::<Vec<_>>())
            .bind(legacy.keys().map(|k| k.1).collect::<Vec<_>>());
        for column in 0..LEGACY_COLUMN_COUNT {
            query = query.bind(legacy.values().map(|(_, c)| c[column]).collect::<Vec<_>>());
        }
        let rows = query.fetch_all(&mut *tx).await?;
        let written = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<HashSet<(String, NaiveDate)>, sqlx::Error>>()?;
        refused = batch::unwritten_legacy_rows(legacy, &written);
    }
    if refused.is_empty() {
        return Ok(());
    }
    let rows: Vec<batch::LegacyCountsColumns> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{} WHERE (campaign_id, stat_date) IN (SELECT * FROM UNNEST($1::text[], $2::date[]))",
        batch::legacy_counts_select()
    )))
    .bind(refused.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind(refused.iter().map(|k| k.1).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let current: Vec<batch::LegacyCountsRow> =
        rows.into_iter().map(batch::legacy_counts_row).collect();
    Err(batch::legacy_refusal(events, plan, &current))
}

/// The channel rollout and phase changes are announced on.
const CHANGES_CHANNEL: &str = "campaign_stats_changes";

/// Announces a change to every replica when the transaction commits.
async fn notify_change(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANGES_CHANNEL)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Ticks `signal` on every announced change, for as long as anyone listens. A lost LISTEN
/// connection ticks too (a change may have been missed while it was down) and is made again.
async fn listen_for_changes(pool: PgPool, signal: watch::Sender<u64>) {
    let mut ticks = 0u64;
    let mut tick = |signal: &watch::Sender<u64>| {
        ticks += 1;
        signal.send_replace(ticks);
    };
    while !pool.is_closed() && !signal.is_closed() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for rollout changes; polling only");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(CHANGES_CHANNEL).await {
            tracing::warn!(%error, "cannot LISTEN for rollout changes; polling only");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        }
        // Listening (again): whatever changed while no one listened is read now.
        tick(&signal);
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(_) => tick(&signal),
                    Err(error) => {
                        tracing::warn!(%error, "lost the LISTEN connection; reconnecting");
                        tick(&signal);
                        break;
                    }
                },
                () = signal.closed() => return,
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn month_of(day: NaiveDate) -> NaiveDate {
    day.with_day(1).expect("day 1 exists in every month")
}

impl Database for PostgresStore {
    async fn update_schema(&self) -> Result<(), StorageError> {
        let before = Shared::<Postgres>::before_schema_update(
            &self.pool,
            &SCHEMA,
            TABLE_EXISTS,
            &EDITED_MIGRATIONS,
        )
        .await?;
        SCHEMA.run(&self.pool).await?;
        Shared::<Postgres>::after_schema_update(&self.pool, before).await?;
        let this_month = month_of(Utc::now().date_naive());
        self.ensure_partitions((0..=PARTITIONS_AHEAD).map(|ahead| this_month + Months::new(ahead)))
            .await;
        Ok(())
    }

    fn statement_timeout(&self) -> std::time::Duration {
        self.statement_timeout
    }

    fn pool_use(&self) -> Vec<PoolUse> {
        vec![super::pool_use("main", &self.pool)]
    }

    async fn ping(&self) -> Result<(), StorageError> {
        Shared::<Postgres>::ping(&self.pool).await
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

impl EventStore for PostgresStore {
    async fn record_events_each(&self, events: &[Event]) -> Result<Vec<bool>, StorageError> {
        self.ensure_partitions(events.iter().map(|e| month_of(e.day())))
            .await;
        let claims = batch::BatchClaims::of(events, &self.owners);
        let mut tx = self.pool.begin().await?;
        let answer = claim(&mut tx, &claims).await?;
        let plan = batch::plan_batch(events, claims.known_owners, answer)?;
        apply(&mut tx, events, &plan).await?;
        tx.commit().await?;
        self.owners.remember(plan.read_owners);
        Ok(plan.duplicates)
    }

    async fn campaign_totals(
        &self,
        source: StorageSource,
        user: &UserId,
        campaigns: &[CampaignId],
        range: DateRange,
    ) -> Result<HashMap<CampaignId, EventTotals>, StorageError> {
        let mut conn = self.pool.acquire().await?;
        Ok(campaign_totals_in(&mut conn, source, user, campaigns, range).await?)
    }

    async fn daily_totals(
        &self,
        source: StorageSource,
        scope: &Scope,
        range: DateRange,
    ) -> Result<Vec<(NaiveDate, EventTotals)>, StorageError> {
        let mut conn = self.pool.acquire().await?;
        Ok(daily_totals_in(&mut conn, source, scope, range).await?)
    }

    async fn campaign_totals_on_both(
        &self,
        user: &UserId,
        campaigns: &[CampaignId],
        range: DateRange,
    ) -> Result<OnBoth<HashMap<CampaignId, EventTotals>>, StorageError> {
        let mut tx = self.pool.begin_with(ONE_SNAPSHOT).await?;
        let legacy =
            campaign_totals_in(&mut tx, StorageSource::Legacy, user, campaigns, range).await?;
        let new = campaign_totals_in(&mut tx, StorageSource::New, user, campaigns, range).await?;
        tx.commit().await?;
        Ok(OnBoth { legacy, new })
    }

    async fn daily_totals_on_both(
        &self,
        scope: &Scope,
        range: DateRange,
    ) -> Result<OnBoth<Vec<(NaiveDate, EventTotals)>>, StorageError> {
        let mut tx = self.pool.begin_with(ONE_SNAPSHOT).await?;
        let legacy = daily_totals_in(&mut tx, StorageSource::Legacy, scope, range).await?;
        let new = daily_totals_in(&mut tx, StorageSource::New, scope, range).await?;
        tx.commit().await?;
        Ok(OnBoth { legacy, new })
    }
}

/// Starts a transaction whose statements all read one snapshot.
const ONE_SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// [`EventStore::campaign_totals`] on `conn`.
async fn campaign_totals_in(
    conn: &mut PgConnection,
    source: StorageSource,
    user: &UserId,
    campaigns: &[CampaignId],
    range: DateRange,
) -> Result<HashMap<CampaignId, EventTotals>, sqlx::Error> {
    if campaigns.is_empty() {
        return Ok(HashMap::new());
    }
    if source == StorageSource::Legacy {
        let mut query = QueryBuilder::<Postgres>::new(format!("SELECT campaign_id, {SUMS} FROM "));
        push_legacy_campaign_rows(&mut query, Some(user), range, campaigns);
        query.push(" GROUP BY campaign_id");
        let sums: Vec<batch::Sums<String>> = query.build_query_as().fetch_all(conn).await?;
        return Ok(batch::campaign_sums(sums));
    }
    // The rollups' primary key `(user_id, campaign_id, day)` serves the whole list.
    let (rows, day) = batch::read_rows(source, None);
    let campaigns: Vec<&str> = campaigns.iter().map(CampaignId::as_str).collect();
    let sums: Vec<batch::Sums<String>> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT campaign_id, {SUMS} FROM {rows} \
         WHERE user_id = $1 AND campaign_id = ANY($2) AND {day} BETWEEN $3 AND $4 \
         GROUP BY campaign_id"
    )))
    .bind(user.as_str())
    .bind(campaigns)
    .bind(range.start)
    .bind(range.end)
    .fetch_all(conn)
    .await?;
    Ok(batch::campaign_sums(sums))
}

/// [`EventStore::daily_totals`] on `conn`.
async fn daily_totals_in(
    conn: &mut PgConnection,
    source: StorageSource,
    scope: &Scope,
    range: DateRange,
) -> Result<Vec<(NaiveDate, EventTotals)>, sqlx::Error> {
    if source == StorageSource::Legacy && !scope.campaigns.is_empty() {
        // Legacy rows through the legacy table's campaign index (see
        // `push_legacy_campaign_rows`).
        let mut query = QueryBuilder::<Postgres>::new(format!("SELECT day, {SUMS} FROM "));
        push_legacy_campaign_rows(&mut query, scope.user.as_ref(), range, &scope.campaigns);
        query.push(" GROUP BY day ORDER BY day");
        let sums: Vec<batch::Sums<NaiveDate>> = query.build_query_as().fetch_all(conn).await?;
        return Ok(sums.into_iter().map(batch::sums_metrics).collect());
    }
    let (rows, day) = batch::read_rows(source, Some(scope));
    let mut query = QueryBuilder::<Postgres>::new(format!("SELECT {day}, {SUMS}"));
    query.push(format_args!(" FROM {rows} WHERE {day} BETWEEN "));
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
        let campaigns: Vec<String> = scope
            .campaigns
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect();
        query
            .push(" AND campaign_id = ANY(")
            .push_bind(campaigns)
            .push(")");
    }
    query.push(format_args!(" GROUP BY {day} ORDER BY {day}"));
    let sums: Vec<batch::Sums<NaiveDate>> = query.build_query_as().fetch_all(conn).await?;
    Ok(sums.into_iter().map(batch::sums_metrics).collect())
}

/// The rows a legacy read of named campaigns sums (the legacy rows and the new storage's
/// clicks, as [`batch::LEGACY_READ_ROWS`] has them), as a subquery with the columns
/// `campaign_id, day` and the counts, each arm with conditions of its own: the legacy rows
/// are found through the legacy table's `UNIQUE (campaign_id, stat_date)` index, the clicks
/// through the rollups' primary key. The user's term on the legacy table is written
/// `user_id || '' = …`, which no index can serve: otherwise the generic plan PostgreSQL
/// keeps for sqlx's prepared statement took the `(user_id, stat_date)` index (for
/// `campaign_id = ANY(…)`, and whenever the table's statistics did not tell campaigns apart
/// better than users, as on a table not analysed yet) and read every row of the user's other
/// campaigns too: one campaign of a user's ten over a year, 1.0 ms against 0.2–0.4 ms in
/// `EXPLAIN ANALYZE`.
fn push_legacy_campaign_rows(
    query: &mut QueryBuilder<Postgres>,
    user: Option<&UserId>,
    range: DateRange,
    campaigns: &[CampaignId],
) {
    let campaigns: Vec<String> = campaigns.iter().map(|c| c.as_str().to_owned()).collect();
    let arms = [
        (
            "(SELECT campaign_id, stat_date AS day, sent, opened, replied, positive_replies, \
             bounced, CAST(0 AS BIGINT) AS clicked FROM campaign_daily_stat_entries \
             WHERE stat_date BETWEEN ",
            " AND user_id || '' = ",
        ),
        (
            " UNION ALL SELECT campaign_id, day, 0, 0, 0, 0, 0, clicked FROM campaign_day_totals \
             WHERE clicked > 0 AND day BETWEEN ",
            " AND user_id = ",
        ),
    ];
    for (start, user_is) in arms {
        query
            .push(start)
            .push_bind(range.start)
            .push(" AND ")
            .push_bind(range.end);
        if let Some(user) = user {
            query.push(user_is).push_bind(user.as_str().to_owned());
        }
        query
            .push(" AND campaign_id = ANY(")
            .push_bind(campaigns.clone())
            .push(")");
    }
    query.push(") AS l");
}

impl PhaseStore for PostgresStore {
    async fn phase(&self) -> Result<PhaseState, StorageError> {
        Shared::<Postgres>::phase(&self.pool).await
    }

    async fn transition(
        &self,
        target: Phase,
        actor: &str,
        reason: &str,
        force: bool,
    ) -> Result<PhaseState, StorageError> {
        // Locks the phase: transitions queue, and no write sees a half-made change.
        let mut tx = self.pool.begin().await?;
        match Shared::<Postgres>::transition(
            &mut tx,
            sql::PHASE_ROW_FOR_UPDATE,
            target,
            actor,
            reason,
            force,
        )
        .await?
        {
            Transitioned::Stayed(state) => Ok(state),
            Transitioned::Moved(state) => {
                notify_change(&mut tx).await?;
                tx.commit().await?;
                Ok(state)
            }
        }
    }

    async fn transitions(&self, limit: u32) -> Result<Vec<Transition>, StorageError> {
        Shared::<Postgres>::transitions(&self.pool, limit).await
    }
}

impl RunStore for PostgresStore {
    async fn create_run(
        &self,
        kind: RunKind,
        actor: &str,
        dry_run: bool,
        batch_size: u32,
    ) -> Result<Run, StorageError> {
        Shared::<Postgres>::create_run(&self.pool, kind, actor, dry_run, batch_size).await
    }

    async fn run(&self, run_id: &str) -> Result<Option<Run>, StorageError> {
        Shared::<Postgres>::run(&self.pool, run_id).await
    }

    async fn recent_runs(&self, limit: u32) -> Result<Vec<Run>, StorageError> {
        Shared::<Postgres>::recent_runs(&self.pool, limit).await
    }

    async fn unfinished_backfill(
        &self,
        dry_run: bool,
        stale_after: std::time::Duration,
    ) -> Result<Option<Run>, StorageError> {
        Shared::<Postgres>::unfinished_backfill(&self.pool, dry_run, stale_after).await
    }

    async fn resume_run(&self, run_id: &str) -> Result<(), StorageError> {
        Shared::<Postgres>::resume_run(&self.pool, run_id).await
    }

    async fn finish_run(
        &self,
        run_id: &str,
        state: RunState,
        error: Option<&str>,
    ) -> Result<(), StorageError> {
        Shared::<Postgres>::finish_run(&self.pool, run_id, state, error).await
    }

    async fn run_issues(&self, run_id: &str, limit: u32) -> Result<RunIssues, StorageError> {
        Shared::<Postgres>::run_issues(&self.pool, run_id, limit).await
    }
}

impl CutoverStore for PostgresStore {
    async fn backfill_batch(&self, run: &Run) -> Result<BatchOutcome, StorageError> {
        let mut tx = self.pool.begin().await?;
        lock_backfill(&mut tx).await?;
        let plan = Shared::<Postgres>::backfill_batch(&mut tx, run, backfill_sql()).await?;
        if !run.dry_run {
            copy_into_rollups(&mut tx, &plan.copies).await?;
        }
        Shared::<Postgres>::record_batch(&mut tx, run, &plan.outcome, &plan.issues).await?;
        tx.commit().await?;
        Ok(plan.outcome)
    }

    async fn resolve_ambiguous(
        &self,
        request: &ResolveRequest,
    ) -> Result<ResolveOutcome, StorageError> {
        let mut tx = self.pool.begin().await?;
        // Resolutions and backfill batches take turns: a batch sees a resolution whole.
        lock_backfill(&mut tx).await?;
        let rows = Shared::<Postgres>::unresolved_rows(&mut tx, &request.filter).await?;
        let plan = plan_resolution(request.resolution, rows)?;
        copy_into_rollups(&mut tx, &plan.copies).await?;
        let outcome = Shared::<Postgres>::record_resolution(&mut tx, request, &plan).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn resolutions(&self, limit: u32) -> Result<Vec<ResolutionRecord>, StorageError> {
        Shared::<Postgres>::resolutions(&self.pool, limit).await
    }

    async fn verify(
        &self,
        range: Option<DateRange>,
        sample_limit: usize,
    ) -> Result<VerifyOutcome, StorageError> {
        // One snapshot for both sides, so that live dual writes cannot show as differences.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let outcome = Shared::<Postgres>::verify(&mut tx, range, sample_limit).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn complete_verify(
        &self,
        run_id: &str,
        outcome: &VerifyOutcome,
    ) -> Result<(), StorageError> {
        let mut tx = self.pool.begin().await?;
        Shared::<Postgres>::complete_verify(&mut tx, run_id, outcome).await?;
        tx.commit().await?;
        Ok(())
    }
}

impl RolloutStore for PostgresStore {
    async fn rollout(&self) -> Result<RolloutSnapshot, StorageError> {
        Shared::<Postgres>::rollout(&self.pool).await
    }

    async fn change_rollout(
        &self,
        change: &RolloutChange,
        expected_version: Option<u64>,
        actor: &str,
        reason: &str,
    ) -> Result<RolloutSnapshot, StorageError> {
        let mut tx = self.pool.begin().await?;
        Shared::<Postgres>::change_rollout(
            &mut tx,
            sql::ROLLOUT_STATE_FOR_UPDATE,
            change,
            expected_version,
            actor,
            reason,
        )
        .await?;
        notify_change(&mut tx).await?;
        tx.commit().await?;
        self.rollout().await
    }

    async fn rollout_history(
        &self,
        before_version: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        Shared::<Postgres>::rollout_history(&self.pool, before_version, limit).await
    }

    async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StorageError> {
        Shared::<Postgres>::hold_lease(&self.pool, name, holder, ttl).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StorageError> {
        Shared::<Postgres>::release_lease(&self.pool, name, holder).await
    }

    fn change_feed(&self) -> Option<super::ChangeFeed> {
        let (signal, changes) = watch::channel(0);
        Some(super::ChangeFeed {
            changes,
            listen: Box::pin(listen_for_changes(self.pool.clone(), signal)),
        })
    }
}

impl AdminStore for PostgresStore {
    async fn table_sizes(&self, tables: &[&'static str]) -> Result<Vec<TableSize>, StorageError> {
        let mut sizes = Vec::with_capacity(tables.len());
        for table in tables {
            // A partitioned table's size is the sum of its partitions'.
            let (rows, bytes): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT (SELECT COUNT(*) FROM {table}), \
                 COALESCE((SELECT SUM(pg_total_relation_size(relid))::int8 \
                  FROM pg_partition_tree('{table}')), pg_total_relation_size('{table}'))"
            )))
            .fetch_one(&self.pool)
            .await?;
            sizes.push(TableSize {
                table,
                rows: rows.max(0) as u64,
                bytes: bytes.max(0) as u64,
            });
        }
        Ok(sizes)
    }

    async fn legacy_zero_rows(&self) -> Result<u64, StorageError> {
        Shared::<Postgres>::legacy_zero_rows(&self.pool).await
    }

    async fn insert_legacy_rows(&self, rows: &[LegacyRow]) -> Result<u64, StorageError> {
        let column = |i: usize| rows.iter().map(|r| r.counts[i]).collect::<Vec<_>>();
        let written = sqlx::query(
            "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, stat_date, sent, \
             opened, replied, positive_replies, bounced) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::date[], $4::int8[], $5::int8[], \
             $6::int8[], $7::int8[], $8::int8[]) \
             ON CONFLICT (campaign_id, stat_date) DO NOTHING",
        )
        .bind(
            rows.iter()
                .map(|r| r.campaign_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.stat_date).collect::<Vec<_>>())
        .bind(column(0))
        .bind(column(1))
        .bind(column(2))
        .bind(column(3))
        .bind(column(4))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(written)
    }

    async fn repair_rollups(
        &self,
        range: DateRange,
        apply: bool,
    ) -> Result<RepairOutcome, StorageError> {
        let mut tx = self.pool.begin().await?;
        // Writes wait until the repair commits (and it waits for those under way), so no
        // event lands between reading a row's sources and rewriting the row.
        sqlx::query("LOCK TABLE campaign_day_totals, all_day_totals IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let outcome = super::repair::repair_rollups::<Postgres>(
            &mut tx,
            range,
            apply,
            "(occurred_at AT TIME ZONE 'UTC')::date",
        )
        .await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// The monthly partitions a name like `events_p2026_03` stands for: its first day.
fn partition_month(name: &str) -> Option<NaiveDate> {
    let (year, month) = name.strip_prefix("events_p")?.split_once('_')?;
    NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, 1)
}

/// Retention drops whole monthly partitions once their last day is past the cutoff (so at
/// least the retention is kept, up to a month more), and deletes what the default partition
/// caught row by row.
impl RetentionStore for PostgresStore {
    async fn prepare_partitions(&self, from: NaiveDate, months: u32) -> Result<(), StorageError> {
        let first = month_of(from);
        self.ensure_partitions((0..=months).map(|ahead| first + Months::new(ahead)))
            .await;
        Ok(())
    }

    async fn prune_raw(
        &self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<Option<Pruned>, StorageError> {
        let mut tx = self.pool.begin().await?;
        // One replica prunes at a time; the others skip this round.
        let ours: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtext('campaign_stats.retention'))",
        )
        .fetch_one(&mut *tx)
        .await?;
        if !ours {
            return Ok(None);
        }
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'events'::regclass",
        )
        .fetch_all(&mut *tx)
        .await?;
        let cutoff_day = cutoff.date_naive();
        let mut dropped = Vec::new();
        for name in names {
            let Some(month) = partition_month(&name) else {
                continue; // the default partition
            };
            if month + Months::new(1) <= cutoff_day {
                // The name was read from the catalogue and matched `events_pYYYY_MM`.
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
                    .execute(&mut *tx)
                    .await?;
                dropped.push((month, name));
            }
        }
        let events = sqlx::query(
            "DELETE FROM events_default WHERE ctid IN \
             (SELECT ctid FROM events_default WHERE occurred_at < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let keys = sqlx::query(sql::PRUNE_KEYS)
            .bind(cutoff)
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        // A month written to again gets its partition back.
        let mut known = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        for (month, _) in &dropped {
            known.remove(month);
        }
        Ok(Some(Pruned {
            partitions: dropped.into_iter().map(|(_, name)| name).collect(),
            events,
            keys,
        }))
    }
}

/// A connection error's own message, without the causes sqlx repeats after it.
fn first_line(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(database) => database.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}
