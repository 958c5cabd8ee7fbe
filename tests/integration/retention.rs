//! Retention: raw events past `--raw-retention-days` are removed (PostgreSQL drops their
//! monthly partitions whole), idempotency keys past it are forgotten, partitions are made
//! ahead, and the rollups every read uses stay as they were.

use std::time::{Duration, Instant};

use campaign_stats::app::RetentionSettings;
use campaign_stats::grpc::proto::{EventType, RecordEventsRequest};
use campaign_stats::migration::Phase;
use campaign_stats::server::ServerConfig;
use campaign_stats::storage::PoolOptions;
use chrono::{Datelike, Months, Utc};

use crate::common::{Backend, TestDb, TestServer, campaign_metrics, event};

crate::on_both_backends!(raw_events_past_the_retention_go_and_rollups_stay);

fn day(days_ago: i64) -> String {
    (Utc::now() - chrono::Duration::days(days_ago))
        .format("%Y-%m-%d")
        .to_string()
}

fn keyed(user: &str, day: &str, key: &str) -> campaign_stats::grpc::proto::Event {
    let mut event = event(user, "c1", EventType::Sent, 1, day);
    event.idempotency_key = key.into();
    event
}

/// Waits until `sql` (one integer) says `wanted`, as the retention job gets to it.
async fn until(db: &TestDb, sql: &str, wanted: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = db.scalar(sql).await;
        if now == wanted {
            return;
        }
        assert!(Instant::now() < deadline, "{sql} stays {now}, not {wanted}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn raw_events_past_the_retention_go_and_rollups_stay(db: TestDb) {
    // NEW_PRIMARY: every event is kept raw, and reads come from the rollups.
    let db = db.in_phase(Phase::NewPrimary);
    let config = ServerConfig {
        retention: RetentionSettings {
            raw_retention: Some(Duration::from_secs(30 * 86_400)),
            partitions_ahead_months: 4,
            every: Duration::from_millis(50),
            batch_rows: 2,
        },
        ..TestServer::config()
    };
    let server = db
        .start_server_configured(&db.url, &PoolOptions::default(), config)
        .await;
    let mut stats = server.stats().await;
    let (old, recent) = (day(100), day(1));
    let events = vec![
        keyed("u1", &old, "old-1"),
        keyed("u1", &old, "old-2"),
        keyed("u1", &old, "old-3"),
        keyed("u1", &recent, "new-1"),
        keyed("u1", &recent, "forgotten"),
    ];
    stats
        .record_events(RecordEventsRequest { events })
        .await
        .expect("record");
    // A key recorded long ago, as if 40 days had passed since.
    let long_ago = match db.backend {
        Backend::Postgres => "now() - interval '40 days'",
        Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-40 days')",
    };
    db.execute(&format!(
        "UPDATE idempotency_keys SET recorded_at = {long_ago} WHERE idempotency_key = 'forgotten'"
    ))
    .await;

    // The old events go (in steps of two rows on SQLite), the recent ones stay.
    until(&db, "SELECT COUNT(*) FROM events", 2).await;
    until(&db, "SELECT COUNT(*) FROM idempotency_keys", 4).await;
    let totals = campaign_metrics(&mut stats, "u1", "c1", &old, &recent).await;
    assert_eq!(totals.sent, 5, "the rollups keep every event");

    // A retry within the window is still recognised; one past it is not.
    let retried = stats
        .record_events(RecordEventsRequest {
            events: vec![
                keyed("u1", &old, "old-1"),
                keyed("u1", &recent, "forgotten"),
            ],
        })
        .await
        .expect("retry")
        .into_inner();
    assert_eq!((retried.stored, retried.duplicates), (1, 1));

    if db.backend == Backend::Postgres {
        let month = |days_ago: i64| {
            let d = Utc::now().date_naive() - chrono::Duration::days(days_ago);
            format!("events_p{:04}_{:02}", d.year(), d.month())
        };
        let partition = |name: String| {
            format!("SELECT COUNT(*) FROM pg_class WHERE relname = '{name}' AND relkind = 'r'")
        };
        until(&db, &partition(month(100)), 0).await;
        assert_eq!(
            db.scalar(&partition(month(1))).await,
            1,
            "a recent month stays"
        );
        let ahead = Utc::now().date_naive() + Months::new(4);
        let ahead = format!("events_p{:04}_{:02}", ahead.year(), ahead.month());
        assert_eq!(
            db.scalar(&partition(ahead)).await,
            1,
            "made four months ahead"
        );
    }
    server.stop().await;
}
