//! The new storage's rollups (issue 9): a wide row per (user, campaign, day) and the striped
//! all-users day totals stay exact under concurrent writers, and a database made by the
//! previous shape (a row per event type) is upgraded in place with its data, as is one that
//! kept the backfilled history in a table of its own.

use campaign_stats::grpc::proto::{
    EventType, GetAggregatedDailyStatsRequest, Granularity, RecordEventsRequest,
};
use std::path::Path;

use campaign_stats::migration::Phase;

use crate::common::{Backend, TestDb, campaign_metrics, event};

crate::on_both_backends!(
    all_users_totals_stay_exact_under_concurrent_writers,
    the_previous_rollup_shape_is_upgraded_in_place,
    backfilled_history_moves_into_the_rollup_rows_in_place,
    verify_walks_a_history_of_many_chunks,
);

const WRITERS: usize = 8;
const BATCHES_PER_WRITER: usize = 20;
const USERS: usize = 20;
const DAYS: [&str; 5] = [
    "2026-03-01",
    "2026-03-02",
    "2026-03-03",
    "2026-03-04",
    "2026-03-05",
];

fn all_users(granularity: Granularity) -> GetAggregatedDailyStatsRequest {
    GetAggregatedDailyStatsRequest {
        user_id: String::new(),
        start_date: "2026-03-01".into(),
        end_date: "2026-03-31".into(),
        granularity: granularity.into(),
        campaign_ids: vec![],
        fill_empty: false,
    }
}

async fn all_users_totals_stay_exact_under_concurrent_writers(db: TestDb) {
    let db = db.in_phase(Phase::NewPrimary);
    let server = db.start_server().await;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let mut stats = server.stats().await;
        writers.push(tokio::spawn(async move {
            for batch in 0..BATCHES_PER_WRITER {
                // Every batch touches every day, for users that other writers touch too.
                let events = (0..USERS)
                    .map(|u| {
                        let day = DAYS[(u + batch + writer) % DAYS.len()];
                        event(&format!("u{u}"), &format!("c{u}"), EventType::Sent, 1, day)
                    })
                    .chain(
                        DAYS.iter()
                            .map(|day| event("u0", "c0", EventType::Clicked, 2, day)),
                    )
                    .collect();
                stats
                    .record_events(RecordEventsRequest { events })
                    .await
                    .expect("concurrent batch");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let batches = (WRITERS * BATCHES_PER_WRITER) as u64;
    let mut stats = server.stats().await;
    let month = stats
        .get_aggregated_daily_stats(all_users(Granularity::Month))
        .await
        .expect("all users by month")
        .into_inner();
    let metrics = month.buckets[0].metrics.expect("metrics");
    assert_eq!(
        (metrics.sent, metrics.clicked),
        (batches * USERS as u64, batches * 2 * DAYS.len() as u64)
    );
    // Day by day, the all-users rollup agrees with the campaign rollups it summarises.
    let days = stats
        .get_aggregated_daily_stats(all_users(Granularity::Day))
        .await
        .expect("all users by day")
        .into_inner();
    assert_eq!(days.buckets.len(), DAYS.len());
    for bucket in &days.buckets {
        let sent = db
            .scalar(&format!(
                "SELECT SUM(sent) FROM campaign_day_totals WHERE day = '{}'",
                bucket.bucket_start
            ))
            .await;
        assert_eq!(
            bucket.metrics.as_ref().expect("metrics").sent,
            sent as u64,
            "{}",
            bucket.bucket_start
        );
    }
    // One user's campaign, read from its wide row.
    let c0 = campaign_metrics(&mut stats, "u0", "c0", "2026-03-01", "2026-03-31").await;
    assert_eq!(c0.clicked, batches * 2 * DAYS.len() as u64);
    // Concurrent writers spread over the stripes of a day.
    assert!(
        db.scalar("SELECT COUNT(DISTINCT stripe) FROM all_day_totals")
            .await
            > 1
    );
    server.stop().await;
}

/// The migrations of the version before the one that brought the migration named `*_{first_left_out}.sql`,
/// applied to `db` as that version would.
async fn migrate_as_the_version_before(db: &TestDb, first_left_out: &str) {
    let (source, extension) = match db.backend {
        Backend::Sqlite => ("migrations/sqlite", "sqlite"),
        Backend::Postgres => ("migrations/postgres", "postgres"),
    };
    let old = tempfile::tempdir().expect("directory");
    let mut names: Vec<String> = std::fs::read_dir(source)
        .expect("migrations")
        .map(|entry| {
            entry
                .expect("migration")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    let suffix = format!("_{first_left_out}.sql");
    assert!(
        names.iter().any(|n| n.ends_with(&suffix)),
        "no migration {suffix}"
    );
    for name in names.iter().take_while(|n| !n.ends_with(&suffix)) {
        std::fs::copy(Path::new(source).join(name), old.path().join(name)).expect("copy");
    }
    let migrator = sqlx::migrate::Migrator::new(old.path())
        .await
        .unwrap_or_else(|e| panic!("{extension} migrations: {e}"));
    match db.backend {
        Backend::Sqlite => {
            let options =
                <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&db.url)
                    .expect("URL")
                    .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.expect("open");
            migrator.run(&pool).await.expect("previous migrations");
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
            migrator.run(&pool).await.expect("previous migrations");
            pool.close().await;
        }
    }
}

async fn the_previous_rollup_shape_is_upgraded_in_place(db: TestDb) {
    migrate_as_the_version_before(&db, "wide_rollups").await;
    db.execute(
        "INSERT INTO campaigns (campaign_id, user_id) VALUES ('c1', 'u1'), ('c2', 'u2'); \
         INSERT INTO daily_rollups (user_id, campaign_id, day, event_type, total) VALUES \
         ('u1', 'c1', '2026-03-01', 1, 5), ('u1', 'c1', '2026-03-01', 3, 2), \
         ('u1', 'c1', '2026-03-02', 2, 4), ('u2', 'c2', '2026-03-02', 4, 7), \
         ('u2', 'c2', '2026-03-02', 5, 1)",
    )
    .await;
    let db = db.in_phase(Phase::NewPrimary);
    let server = db.start_server().await;
    let mut stats = server.stats().await;
    let c1 = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
    assert_eq!((c1.sent, c1.opened, c1.clicked), (5, 4, 2));
    let c2 = campaign_metrics(&mut stats, "u2", "c2", "2026-03-01", "2026-03-31").await;
    assert_eq!((c2.replied, c2.positive_replies), (7, 1));
    let month = stats
        .get_aggregated_daily_stats(all_users(Granularity::Month))
        .await
        .expect("all users")
        .into_inner();
    let all = month.buckets[0].metrics.expect("metrics");
    assert_eq!(
        (
            all.sent,
            all.opened,
            all.clicked,
            all.replied,
            all.positive_replies
        ),
        (5, 4, 2, 7, 1)
    );
    // One wide row per (user, campaign, day); the old table is gone.
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM campaign_day_totals").await,
        3
    );
    let old_tables = match db.backend {
        Backend::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'daily_rollups'"
        }
        Backend::Postgres => "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'daily_rollups'",
    };
    assert_eq!(db.scalar(old_tables).await, 0);
    server.stop().await;
}

async fn backfilled_history_moves_into_the_rollup_rows_in_place(db: TestDb) {
    use campaign_stats::grpc::proto::RepairRollupsRequest;
    use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;

    migrate_as_the_version_before(&db, "backfilled_in_rollups").await;
    // March 1st: 5 sends and 2 opens a backfill copied, remembered apart. March 2nd: 3 sends
    // that neither a backfill nor a raw event accounts for (a bad manual fix).
    db.execute(
        "INSERT INTO campaigns (campaign_id, user_id) VALUES ('c1', 'u1'); \
         INSERT INTO campaign_day_totals (user_id, campaign_id, day, sent, opened) VALUES \
         ('u1', 'c1', '2026-03-01', 5, 2), ('u1', 'c1', '2026-03-02', 3, 0); \
         INSERT INTO backfilled_totals (user_id, campaign_id, day, sent, opened) VALUES \
         ('u1', 'c1', '2026-03-01', 5, 2)",
    )
    .await;
    let db = db.in_phase(Phase::NewPrimary);
    let server = db.start_server().await;
    // The backfilled part now lives in the row itself, and the table is gone.
    let backfilled = |day: &str| {
        format!(
            "SELECT COALESCE(backfilled_sent, -1) * 10 + COALESCE(backfilled_opened, -1) \
             FROM campaign_day_totals WHERE day = '{day}'"
        )
    };
    assert_eq!(db.scalar(&backfilled("2026-03-01")).await, 52);
    assert_eq!(db.scalar(&backfilled("2026-03-02")).await, -11);
    let old_tables = match db.backend {
        Backend::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'backfilled_totals'"
        }
        Backend::Postgres => "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'backfilled_totals'",
    };
    assert_eq!(db.scalar(old_tables).await, 0);
    // Rollup repair still tells backfilled history from a bad row: only March 2nd differs.
    let mut client = MigrationServiceClient::new(server.channel().await);
    let report = client
        .repair_rollups(RepairRollupsRequest {
            start_date: "2026-03-01".into(),
            end_date: "2026-03-31".into(),
            apply: true,
            reason: "after the upgrade".into(),
            actor: "tester".into(),
        })
        .await
        .expect("repair")
        .into_inner();
    let differing: Vec<(&str, u64)> = report
        .rows
        .iter()
        .map(|r| (r.date.as_str(), r.stored.unwrap_or_default().sent))
        .collect();
    assert_eq!(differing, [("2026-03-02", 3)]);
    let mut stats = server.stats().await;
    let c1 = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
    assert_eq!((c1.sent, c1.opened), (5, 2));
    server.stop().await;
}

/// Campaigns × days of the history verify walks: 2.5 of its chunks of 10,000 keys.
const VERIFY_CAMPAIGNS: u32 = 250;
const VERIFY_DAYS: u32 = 100;

async fn verify_walks_a_history_of_many_chunks(db: TestDb) {
    use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
    use campaign_stats::grpc::proto::{
        MigrationPhase, StartBackfillRequest, TransitionPhaseRequest, VerifyConsistencyRequest,
        WatchRunRequest,
    };
    use tokio_stream::StreamExt;

    let server = db.start_server().await;
    let keys = match db.backend {
        Backend::Postgres => format!(
            "SELECT 'camp-' || lpad(c::text, 4, '0') AS campaign, DATE '2025-01-01' + d AS day \
             FROM generate_series(0, {} - 1) c, generate_series(0, {} - 1) d",
            VERIFY_CAMPAIGNS, VERIFY_DAYS
        ),
        Backend::Sqlite => format!(
            "WITH RECURSIVE cs(c) AS (SELECT 0 UNION ALL SELECT c + 1 FROM cs WHERE c < {} - 1), \
             ds(d) AS (SELECT 0 UNION ALL SELECT d + 1 FROM ds WHERE d < {} - 1) \
             SELECT printf('camp-%04d', c) AS campaign, date('2025-01-01', '+' || d || ' days') \
             AS day FROM cs, ds",
            VERIFY_CAMPAIGNS, VERIFY_DAYS
        ),
    };
    db.execute(&format!(
        "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, stat_date, sent) \
         SELECT campaign, 'u1', day, 1 FROM ({keys}) AS k"
    ))
    .await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    client
        .transition_phase(TransitionPhaseRequest {
            force: false,
            target: MigrationPhase::DualWrite.into(),
            reason: "test".into(),
            actor: "tester".into(),
        })
        .await
        .expect("dual-write");
    let run_id = client
        .start_backfill(StartBackfillRequest {
            dry_run: false,
            batch_size: 10_000,
            throttle_ms: 0,
            actor: "tester".into(),
        })
        .await
        .expect("backfill")
        .into_inner()
        .run_id;
    let mut progress = client
        .watch_run(WatchRunRequest { run_id })
        .await
        .expect("watch")
        .into_inner();
    while let Some(update) = progress.next().await {
        update.expect("progress");
    }
    let mut verify = async || {
        client
            .verify_consistency(VerifyConsistencyRequest {
                start_date: String::new(),
                end_date: String::new(),
                actor: "tester".into(),
            })
            .await
            .expect("verify")
            .into_inner()
    };
    let clean = verify().await;
    let keys = u64::from(VERIFY_CAMPAIGNS * VERIFY_DAYS);
    assert_eq!((clean.compared, clean.mismatches), (keys, 0));

    // Differences in the first chunk, the last, and a key only the new storage has.
    db.execute(
        "UPDATE campaign_daily_stat_entries SET sent = 2 WHERE campaign_id = 'camp-0000' \
         AND stat_date = '2025-01-01'; \
         UPDATE campaign_daily_stat_entries SET sent = 3 WHERE campaign_id = 'camp-0249' \
         AND stat_date = '2025-04-10'; \
         INSERT INTO campaign_day_totals (user_id, campaign_id, day, bounced) \
         VALUES ('u1', 'zzz', '2025-06-01', 4)",
    )
    .await;
    let found = verify().await;
    assert_eq!((found.compared, found.mismatches), (keys + 1, 3));
    let mut differences: Vec<(String, String, i64, i64)> = found
        .sample
        .into_iter()
        .map(|m| (m.campaign_id, m.metric, m.legacy, m.new))
        .collect();
    differences.sort();
    assert_eq!(
        differences,
        [
            ("camp-0000".to_owned(), "sent".to_owned(), 2, 1),
            ("camp-0249".to_owned(), "sent".to_owned(), 3, 1),
            ("zzz".to_owned(), "bounced".to_owned(), 0, 4),
        ]
    );
    server.stop().await;
}
