//! Shadow reads: sampled reads run again on the other storage after the caller has its
//! answer; agreements and disagreements are counted, and disagreements kept with both values
//! for people to read.

use std::time::{Duration, Instant};

use campaign_stats::app::ShadowSettings;
use campaign_stats::grpc::proto::{EventType, ListShadowMismatchesRequest, RecordEventsRequest};
use campaign_stats::migration::Phase;
use campaign_stats::server::ServerConfig;
use campaign_stats::storage::PoolOptions;

use crate::common::{TestDb, TestServer, campaign_metrics, event};

crate::on_both_backends!(shadow_reads_count_agreements_and_keep_disagreements);

const MATCHED: &str =
    "campaign_stats_shadow_comparisons_total{method=\"campaign_totals\",outcome=\"match\"}";
const MISMATCHED: &str =
    "campaign_stats_shadow_comparisons_total{method=\"campaign_totals\",outcome=\"mismatch\"}";

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
    let mismatches = server
        .rollout()
        .await
        .list_shadow_mismatches(ListShadowMismatchesRequest {})
        .await
        .expect("mismatches")
        .into_inner()
        .mismatches;
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
}

async fn a_stuck_shadow_storage_never_holds_up_primary_reads(db: TestDb) {
    use sqlx::Connection;
    // NEW_PRIMARY: reads come from the new storage, shadows go to the legacy table.
    let db = db.in_phase(Phase::NewPrimary);
    let config = ServerConfig {
        shadow: ShadowSettings {
            sample_rate: 1.0,
            queue: 2,
            workers: 1,
            timeout: Duration::from_millis(300),
        },
        ..TestServer::config()
    };
    let server = db
        .start_server_configured(&db.url, &PoolOptions::default(), config)
        .await;
    let mut stats = server.stats().await;
    stats
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
