//! Rollup repair: a rollup row corrupted on purpose is found by the dry run, which changes
//! nothing, and restored when applied; backfilled history (no raw events behind it) is kept,
//! and the all-users view is rebuilt around the repaired rows.

use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
use campaign_stats::grpc::proto::{
    EventType, MigrationPhase, RecordEventsRequest, RepairRollupsRequest, RepairRollupsResponse,
};
use campaign_stats::server::ServerConfig;
use campaign_stats::storage::PoolOptions;
use tonic::Code;
use tonic::transport::Channel;

use crate::backfill::backfill;
use crate::common::{TestDb, TestServer, event};

crate::on_both_backends!(
    a_corrupted_rollup_is_found_by_the_dry_run_and_restored,
    a_repair_before_the_raw_retention_is_refused,
);

/// `RepairRollups` over March 2026.
async fn try_repair(
    client: &mut MigrationServiceClient<Channel>,
    apply: bool,
) -> Result<RepairRollupsResponse, tonic::Status> {
    client
        .repair_rollups(RepairRollupsRequest {
            start_date: "2026-03-01".into(),
            end_date: "2026-03-31".into(),
            apply,
            reason: "a bad manual fix".into(),
            actor: "tester".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn repair(
    client: &mut MigrationServiceClient<Channel>,
    apply: bool,
) -> RepairRollupsResponse {
    try_repair(client, apply).await.expect("repair")
}

/// Sums of `column` over the campaign rollups and over the all-users rollup.
async fn sums(db: &TestDb, column: &str) -> (i64, i64) {
    (
        db.scalar(&format!(
            "SELECT COALESCE(SUM({column}), 0) FROM campaign_day_totals"
        ))
        .await,
        db.scalar(&format!(
            "SELECT COALESCE(SUM({column}), 0) FROM all_day_totals"
        ))
        .await,
    )
}

async fn a_corrupted_rollup_is_found_by_the_dry_run_and_restored(db: TestDb) {
    let server = db.start_server().await;
    // Legacy history of campaign c1 before the migration: 5 sends on March 1st.
    db.execute(
        "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, stat_date, sent, opened, \
         replied, positive_replies, bounced) VALUES ('c1', 'u1', '2026-03-01', 5, 0, 0, 0, 0)",
    )
    .await;
    server
        .transition(MigrationPhase::DualWrite, false, "test")
        .await
        .expect("DUAL_WRITE");
    let mut stats = server.stats().await;
    let events = vec![
        event("u1", "c1", EventType::Sent, 2, "2026-03-01"),
        event("u1", "c2", EventType::Sent, 3, "2026-03-02"),
        event("u1", "c2", EventType::Opened, 1, "2026-03-02"),
    ];
    stats
        .record_events(RecordEventsRequest { events })
        .await
        .expect("record");
    let mut client = MigrationServiceClient::new(server.channel().await);
    assert_eq!(backfill(&mut client, false, 100).await.state, "completed");
    // c1's day: 5 backfilled from legacy + 2 raw; c2's: 3 raw.
    assert_eq!(sums(&db, "sent").await, (10, 10));
    let clean = repair(&mut client, false).await;
    assert_eq!(
        (clean.checked, clean.differing, clean.all_users_days),
        (2, 0, 0)
    );

    // A bad manual fix: c2's sends inflated, c1 given opens it never had.
    db.execute("UPDATE campaign_day_totals SET sent = sent + 100 WHERE campaign_id = 'c2'")
        .await;
    db.execute("UPDATE campaign_day_totals SET opened = 9 WHERE campaign_id = 'c1'")
        .await;
    let dry = repair(&mut client, false).await;
    assert!(!dry.applied);
    assert_eq!(dry.differing, 2);
    let rows: Vec<(&str, &str, u64, u64, u64, u64)> = dry
        .rows
        .iter()
        .map(|r| {
            let (stored, expected) = (r.stored.unwrap_or_default(), r.expected.unwrap_or_default());
            (
                r.campaign_id.as_str(),
                r.date.as_str(),
                stored.sent,
                expected.sent,
                stored.opened,
                expected.opened,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("c1", "2026-03-01", 7, 7, 9, 0),
            ("c2", "2026-03-02", 103, 3, 1, 1)
        ]
    );
    // The all-users rollup was right; the campaign rows were not: it stays right.
    assert_eq!(dry.all_users_days, 0);
    assert_eq!(
        sums(&db, "sent").await,
        (110, 10),
        "a dry run changes nothing"
    );

    let applied = repair(&mut client, true).await;
    assert!(applied.applied);
    assert_eq!(applied.differing, 2);
    assert_eq!(sums(&db, "sent").await, (10, 10));
    assert_eq!(sums(&db, "opened").await, (1, 1));
    assert_eq!(repair(&mut client, false).await.differing, 0);

    // A corrupted all-users day is rebuilt from its campaign rows.
    db.execute("UPDATE all_day_totals SET sent = sent + 50")
        .await;
    let day = repair(&mut client, true).await;
    assert_eq!((day.differing, day.all_users_days), (0, 2));
    assert_eq!(sums(&db, "sent").await, (10, 10));

    // The operator's command: a dry run by default, JSON for scripts.
    db.execute("UPDATE campaign_day_totals SET sent = 0 WHERE campaign_id = 'c2'")
        .await;
    let addr = server.addr.to_string();
    let march = async |extra: &[&str]| {
        let mut args = vec![
            "repair-rollups",
            "--from",
            "2026-03-01",
            "--to",
            "2026-03-31",
            "--reason",
            "check",
            "--server",
            &addr,
        ];
        args.extend_from_slice(extra);
        crate::cli::cli(&args).await
    };
    let (ok, stdout, stderr) = march(&["--output", "json"]).await;
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["differing"], 1, "{report}");
    assert_eq!(report["applied"], false);
    assert_eq!(report["rows"][0]["expected"]["sent"], 3, "{report}");
    let (ok, stdout, stderr) = march(&["--apply"]).await;
    assert!(ok && stdout.contains("applied"), "{stdout}{stderr}");
    assert_eq!(sums(&db, "sent").await, (10, 10));
    server.stop().await;
}

async fn a_repair_before_the_raw_retention_is_refused(db: TestDb) {
    let config = ServerConfig {
        retention: campaign_stats::app::RetentionSettings {
            raw_retention: Some(std::time::Duration::from_secs(30 * 86_400)),
            ..campaign_stats::app::RetentionSettings::DEFAULT
        },
        ..TestServer::config()
    };
    let server = db
        .start_server_configured(&db.url, &PoolOptions::default(), config)
        .await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    let status = try_repair(&mut client, false)
        .await
        .expect_err("raw events of March are gone");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("raw events are kept from"),
        "{status:?}"
    );
    server.stop().await;
}
