//! Shadow reads: sampled reads run again on the other storage after the caller has its
//! answer; agreements and disagreements are counted, and disagreements kept with both values
//! for people to read.

use std::time::{Duration, Instant};

use campaign_stats::app::ShadowSettings;
use campaign_stats::grpc::proto::{
    EventType, GetAggregatedDailyStatsRequest, Granularity, ListShadowMismatchesRequest,
    RecordEventsRequest, ShadowMismatch,
};
use campaign_stats::migration::Phase;
use campaign_stats::server::ServerConfig;
use campaign_stats::storage::PoolOptions;

use crate::common::{TestDb, TestServer, campaign_metrics, event};

crate::on_both_backends!(shadow_reads_count_agreements_and_keep_disagreements);

const MATCHED: &str =
    "campaign_stats_shadow_comparisons_total{method=\"campaign_totals\",outcome=\"match\"}";
const MISMATCHED: &str =
    "campaign_stats_shadow_comparisons_total{method=\"campaign_totals\",outcome=\"mismatch\"}";
const DAILY_MISMATCHED: &str =
    "campaign_stats_shadow_comparisons_total{method=\"daily_totals\",outcome=\"mismatch\"}";

/// Waits until the scrape's `series` reaches `wanted` (shadow reads run after the answer).
async fn until_counted(server: &TestServer, series: &str, wanted: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = server.metrics().await.value(series).unwrap_or(0.0);
        if now >= wanted {
            assert_eq!(now, wanted, "{series} went past {wanted}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stays at {now}, not {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The disagreements the server keeps, newest first.
async fn kept_mismatches(server: &TestServer) -> Vec<ShadowMismatch> {
    server
        .rollout()
        .await
        .list_shadow_mismatches(ListShadowMismatchesRequest {})
        .await
        .expect("mismatches")
        .into_inner()
        .mismatches
}

async fn shadow_reads_count_agreements_and_keep_disagreements(db: TestDb) {
    // VERIFIED: both storages hold everything, reads go to LEGACY (0 %), every read shadowed.
    let db = db.in_phase(Phase::Verified);
    let config = ServerConfig {
        shadow: ShadowSettings {
            sample_rate: 1.0,
            ..ShadowSettings::DEFAULT
        },
        ..TestServer::config()
    };
    let server = db
        .start_server_configured(&db.url, &PoolOptions::default(), config)
        .await;
    let mut stats = server.stats().await;
    let events = vec![
        event("u1", "c1", EventType::Sent, 4, "2026-03-01"),
        event("u1", "c1", EventType::Opened, 2, "2026-03-02"),
    ];
    stats
        .record_events(RecordEventsRequest { events })
        .await
        .expect("record");
    for _ in 0..10 {
        let read = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
        assert_eq!(read.sent, 4);
    }
    until_counted(&server, MATCHED, 10.0).await;
    assert_eq!(server.metrics().await.value(MISMATCHED).unwrap_or(0.0), 0.0);

    // The rate set at run time for every replica wins over the flag, and is audited.
    let addr = server.addr.to_string();
    let shadow_rate = async |rate: &str| {
        let (ok, _, stderr) = crate::cli::cli(&[
            "rollout",
            "shadow-rate",
            rate,
            "--reason",
            "tune",
            "--server",
            &addr,
        ])
        .await;
        assert!(ok, "{stderr}");
    };
    shadow_rate("0").await;
    assert_eq!(server.current_rollout().await.shadow_sample_rate, Some(0.0));
    for _ in 0..5 {
        campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
    }
    shadow_rate("default").await;
    assert_eq!(server.current_rollout().await.shadow_sample_rate, None);
    campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
    // Only the read after the flag came back was shadowed.
    until_counted(&server, MATCHED, 11.0).await;
    let history = server.rollout_history(2, "").await.changes;
    let audited: Vec<(&str, &str, &str)> = history
        .iter()
        .map(|c| (c.change.as_str(), c.before.as_str(), c.after.as_str()))
        .collect();
    assert_eq!(
        audited,
        [
            ("shadow sample rate", "0.0000%", "server default"),
            ("shadow sample rate", "server default", "0.0000%"),
        ]
    );

    // A divergence planted in the new storage: the caller still gets LEGACY's answer, and
    // the shadow read counts and keeps the difference.
    db.execute(
        "UPDATE campaign_day_totals SET sent = sent + 1 WHERE campaign_id = 'c1' AND sent > 0",
    )
    .await;
    for _ in 0..3 {
        let read = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
        assert_eq!(read.sent, 4, "the primary answer");
    }
    until_counted(&server, MISMATCHED, 3.0).await;
    let mismatches = kept_mismatches(&server).await;
    assert_eq!(mismatches.len(), 3);
    let first = &mismatches[0];
    assert_eq!(
        (
            first.method.as_str(),
            first.user_id.as_str(),
            first.campaign_id.as_str()
        ),
        ("campaign_totals", "u1", "c1")
    );
    let (legacy, new) = (
        first.legacy.unwrap_or_default(),
        first.new.unwrap_or_default(),
    );
    assert_eq!(
        (legacy.sent, new.sent, legacy.opened, new.opened),
        (4, 5, 2, 2)
    );
    assert!(first.at.is_some());

    // The same through the command line.
    let addr = server.addr.to_string();
    let (ok, stdout, stderr) = crate::cli::cli(&[
        "rollout",
        "mismatches",
        "--server",
        &addr,
        "--output",
        "json",
    ])
    .await;
    assert!(ok, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    assert_eq!(listed[0]["new"]["sent"], 5, "{listed}");

    // The daily series of the same user: the day that differs, with both values.
    let series = stats
        .get_aggregated_daily_stats(GetAggregatedDailyStatsRequest {
            user_id: "u1".into(),
            start_date: "2026-03-01".into(),
            end_date: "2026-03-31".into(),
            granularity: Granularity::Day.into(),
            ..Default::default()
        })
        .await
        .expect("series")
        .into_inner();
    assert_eq!(series.buckets[0].metrics.unwrap_or_default().sent, 4);
    until_counted(&server, DAILY_MISMATCHED, 1.0).await;
    let newest = kept_mismatches(&server).await.remove(0);
    assert_eq!(
        (
            newest.method.as_str(),
            newest.date.as_str(),
            newest.legacy.unwrap_or_default().sent,
            newest.new.unwrap_or_default().sent
        ),
        ("daily_totals", "2026-03-01", 4, 5)
    );
    server.stop().await;
}

/// The other storage stops answering (its table locked by another session): primary reads
/// still complete, every one of them while the lock is held, and the shadow reads that
/// cannot run time out or are dropped, each counted. PostgreSQL only: SQLite has no
/// per-table lock that blocks one storage's reads and not the other's.
mod postgres_only {
    #[cfg_attr(
        not(postgres_tests),
        ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
    )]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_shadow_storage_never_holds_up_primary_reads() {
        if let Some(db) = crate::common::TestDb::create(crate::common::Backend::Postgres).await {
            super::a_stuck_shadow_storage_never_holds_up_primary_reads(db).await;
        }
    }

    #[cfg_attr(
        not(postgres_tests),
        ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
    )]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_between_the_primary_and_the_shadow_read_is_no_mismatch() {
        if let Some(db) = crate::common::TestDb::create(crate::common::Backend::Postgres).await {
            super::a_write_between_the_primary_and_the_shadow_read_is_no_mismatch(db).await;
        }
    }
}

/// A server on `db` (in NEW_PRIMARY: reads from the new storage, shadows of every read on the
/// legacy table) holding 4 sends of `u1`'s campaign `c1` on 2026-03-01, and a transaction that holds
/// the legacy table locked against every read.
async fn shadowing_new_primary(
    db: &TestDb,
    shadow: ShadowSettings,
) -> (TestServer, sqlx::PgConnection) {
    use sqlx::Connection;
    let config = ServerConfig {
        shadow: ShadowSettings {
            sample_rate: 1.0,
            ..shadow
        },
        ..TestServer::config()
    };
    let server = db
        .start_server_configured(&db.url, &PoolOptions::default(), config)
        .await;
    server
        .stats()
        .await
        .record_events(RecordEventsRequest {
            events: vec![event("u1", "c1", EventType::Sent, 4, "2026-03-01")],
        })
        .await
        .expect("record");
    let mut locker = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE campaign_daily_stat_entries IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .expect("lock the legacy table");
    (server, locker)
}

/// A write that commits after the primary read answered and before its shadow read runs
/// makes the two answers differ, though the storages agree: the comparison reads both again
/// in one snapshot before it counts a mismatch. PostgreSQL only: the shadow read is held back
/// by a lock on the legacy table alone (see above), which makes the order certain.
async fn a_write_between_the_primary_and_the_shadow_read_is_no_mismatch(db: TestDb) {
    let db = db.in_phase(Phase::NewPrimary);
    let (server, mut writer) = shadowing_new_primary(&db, ShadowSettings::DEFAULT).await;
    let mut stats = server.stats().await;
    let read = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
    assert_eq!(read.sent, 4, "the primary answer, before the write");
    // The write lands in both storages in one transaction, as a dual write does, while the
    // shadow read waits for the lock; it then reads legacy after the write.
    sqlx::raw_sql(
        "UPDATE campaign_daily_stat_entries SET sent = sent + 1 WHERE campaign_id = 'c1'; \
         UPDATE campaign_day_totals SET sent = sent + 1 WHERE campaign_id = 'c1'; COMMIT",
    )
    .execute(&mut writer)
    .await
    .expect("write to both storages");
    until_counted(&server, MATCHED, 1.0).await;
    let scrape = server.metrics().await;
    assert_eq!(scrape.value(MISMATCHED).unwrap_or(0.0), 0.0);
    let read = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
    assert_eq!(read.sent, 5, "the write is visible");
    until_counted(&server, MATCHED, 2.0).await;
    server.stop().await;
}

async fn a_stuck_shadow_storage_never_holds_up_primary_reads(db: TestDb) {
    let settings = ShadowSettings {
        queue: 2,
        workers: 1,
        timeout: Duration::from_millis(300),
        ..ShadowSettings::DEFAULT
    };
    let db = db.in_phase(Phase::NewPrimary);
    let (server, locker) = shadowing_new_primary(&db, settings).await;
    let mut stats = server.stats().await;
    for _ in 0..20 {
        let read = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
        assert_eq!(read.sent, 4);
    }
    // Every primary read finished with the legacy table still locked.
    let scrape = server.metrics().await;
    let dropped = scrape.get("campaign_stats_shadow_dropped_reads_total");
    assert!(dropped > 0.0, "a full queue drops shadow reads");
    let timeout =
        "campaign_stats_shadow_comparisons_total{method=\"campaign_totals\",outcome=\"timeout\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metrics().await.value(timeout).unwrap_or(0.0) == 0.0 {
        assert!(Instant::now() < deadline, "no shadow read timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(locker);
    server.stop().await;
}
