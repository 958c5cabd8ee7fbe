//! The Prometheus endpoint: what a replica applies, and what it served, as scraped.

use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
use campaign_stats::grpc::proto::{
    EventType, GetStatsRequest, RecordEventsRequest, SetRolloutPercentageRequest, StorageSource,
};
use campaign_stats::migration::Phase;
use tonic::Code;

use crate::common::{TestDb, event};

crate::on_both_backends!(metrics_show_the_applied_rollout_and_the_traffic);

const GET_STATS_OK_NEW: &str = r#"campaign_stats_grpc_server_handling_seconds_count{method="/stats.v1.StatsService/GetStats",code="OK",source="new"}"#;
const GET_STATS_OK_LEGACY: &str = r#"campaign_stats_grpc_server_handling_seconds_count{method="/stats.v1.StatsService/GetStats",code="OK",source="legacy"}"#;
const RECORD_OK: &str = r#"campaign_stats_grpc_server_handling_seconds_count{method="/stats.v1.StatsService/RecordEvents",code="OK",source="none"}"#;
const GET_STATS_INVALID: &str = r#"campaign_stats_grpc_server_handling_seconds_count{method="/stats.v1.StatsService/GetStats",code="INVALID_ARGUMENT",source="none"}"#;
const READS_NEW: &str =
    r#"campaign_stats_read_seconds_count{method="campaign_totals",source="new"}"#;
const READS_LEGACY: &str =
    r#"campaign_stats_read_seconds_count{method="campaign_totals",source="legacy"}"#;

async fn metrics_show_the_applied_rollout_and_the_traffic(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let server = db.start_server().await;
    let before = server.metrics().await;
    assert_eq!(before.get("campaign_stats_rollout_applied_version"), 0.0);
    assert_eq!(before.get("campaign_stats_rollout_percentage"), 0.0);
    assert_eq!(before.get("campaign_stats_rollout_kill_switch"), 0.0);
    assert_eq!(
        before.get(r#"campaign_stats_migration_phase{phase="VERIFIED"}"#),
        1.0
    );
    assert_eq!(
        before.get(r#"campaign_stats_migration_phase{phase="LEGACY_ONLY"}"#),
        0.0
    );
    assert_eq!(before.value(GET_STATS_OK_NEW), None);

    // Two changes through this replica: it applies each at once.
    let mut rollout = RolloutServiceClient::new(server.channel().await);
    rollout
        .set_rollout_percentage(SetRolloutPercentageRequest {
            percentage: 100.0,
            expected_version: 0,
            reason: "all in".into(),
            ..Default::default()
        })
        .await
        .expect("100%");
    let at_100 = server.metrics().await;
    assert_eq!(at_100.get("campaign_stats_rollout_applied_version"), 1.0);
    assert_eq!(at_100.get("campaign_stats_rollout_percentage"), 100.0);

    // Traffic: one batch of three events, reads from each storage, one bad request.
    let mut stats = server.stats().await;
    let events = (0..3)
        .map(|i| event("u", "c", EventType::Sent, 1, &format!("2026-02-0{}", i + 1)))
        .collect();
    stats
        .record_events(RecordEventsRequest { events })
        .await
        .expect("record");
    let get = GetStatsRequest {
        user_id: "u".into(),
        campaign_id: "c".into(),
        start_date: "2026-02-01".into(),
        end_date: "2026-02-28".into(),
    };
    let read = stats
        .get_stats(get.clone())
        .await
        .expect("read")
        .into_inner();
    assert_eq!(read.source, i32::from(StorageSource::New));
    server
        .kill_switch(true, "incident")
        .await
        .expect("kill switch");
    let read = stats
        .get_stats(get.clone())
        .await
        .expect("read")
        .into_inner();
    assert_eq!(read.source, i32::from(StorageSource::Legacy));
    let bad = stats
        .get_stats(GetStatsRequest {
            user_id: String::new(),
            ..get
        })
        .await
        .expect_err("empty user");
    assert_eq!(bad.code(), Code::InvalidArgument);

    let after = server.metrics().await;
    assert_eq!(after.get("campaign_stats_rollout_applied_version"), 2.0);
    assert_eq!(after.get("campaign_stats_rollout_kill_switch"), 1.0);
    assert_eq!(after.get(GET_STATS_OK_NEW), 1.0);
    assert_eq!(after.get(GET_STATS_OK_LEGACY), 1.0);
    assert_eq!(after.get(RECORD_OK), 1.0);
    assert_eq!(after.get(GET_STATS_INVALID), 1.0);
    assert_eq!(after.get(READS_NEW), 1.0);
    assert_eq!(after.get(READS_LEGACY), 1.0);
    assert_eq!(after.get("campaign_stats_recorded_batch_events_count"), 1.0);
    assert_eq!(after.get("campaign_stats_recorded_batch_events_sum"), 3.0);
    let max_pool = match db.backend {
        crate::common::Backend::Sqlite => {
            r#"campaign_stats_db_pool_connections{pool="writer",state="max"}"#
        }
        crate::common::Backend::Postgres => {
            r#"campaign_stats_db_pool_connections{pool="main",state="max"}"#
        }
    };
    assert!(after.get(max_pool) >= 1.0);
    server.stop().await;
}
