//! Group commit (issue 10): concurrent `RecordEvent` calls share a transaction, and each
//! caller still gets its own answer.

use std::time::Duration;

use campaign_stats::app::GroupCommitSettings;
use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{EventType, RecordEventRequest};
use campaign_stats::migration::Phase;
use campaign_stats::server::ServerConfig;
use campaign_stats::storage::PoolOptions;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{TestDb, TestServer, event};

crate::on_both_backends!(
    concurrent_callers_each_get_their_own_answer,
    a_failed_group_fails_each_caller_retryably_and_a_retry_counts_once,
    a_flood_past_the_queue_is_refused_at_once,
    shutdown_answers_every_queued_caller,
);

/// Test settings with group commit as given.
fn grouping(max_events: usize, window: Duration, queue_events: usize) -> ServerConfig {
    ServerConfig {
        group_commit: GroupCommitSettings {
            max_events,
            window,
            queue_events,
            // One flusher: the window alone decides what shares a transaction.
            flushers: 1,
        },
        ..TestServer::config()
    }
}

fn pool() -> PoolOptions {
    PoolOptions {
        max_connections: 8,
        acquire_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(1),
    }
}

fn sent(user: &str, campaign: &str, key: &str) -> RecordEventRequest {
    let mut one = event(user, campaign, EventType::Sent, 1, "2026-03-01");
    one.idempotency_key = key.into();
    RecordEventRequest { event: Some(one) }
}

/// Sends every request at once, each on its own task; answers in request order.
async fn all_at_once(
    stats: &StatsServiceClient<Channel>,
    requests: Vec<RecordEventRequest>,
) -> Vec<Result<bool, tonic::Status>> {
    let calls: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let mut stats = stats.clone();
            tokio::spawn(async move {
                stats
                    .record_event(request)
                    .await
                    .map(|response| response.into_inner().duplicate)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("a call task"));
    }
    answers
}

async fn total_sent(db: &TestDb) -> i64 {
    db.scalar("SELECT COALESCE(SUM(sent), 0) FROM campaign_day_totals")
        .await
}

async fn concurrent_callers_each_get_their_own_answer(db: TestDb) {
    let db = db.in_phase(Phase::DualWrite);
    // A long window, so that every call below lands in one group.
    let server = db
        .start_server_configured(
            &db.url,
            &pool(),
            grouping(1_000, Duration::from_millis(300), 1_000),
        )
        .await;
    let mut stats = server.stats().await;
    stats
        .record_event(sent("owner", "taken", ""))
        .await
        .expect("the campaign gets its owner");
    let batches_before = server
        .metrics()
        .await
        .get("campaign_stats_recorded_batch_events_count");

    let mut requests = Vec::new();
    for i in 0..30 {
        requests.push(sent(&format!("u{}", i % 3), &format!("c{}", i % 3), ""));
    }
    for pair in 0..5 {
        let key = format!("k{pair}");
        requests.push(sent("u0", "c0", &key));
        requests.push(sent("u0", "c0", &key));
    }
    for _ in 0..3 {
        requests.push(sent("intruder", "taken", ""));
    }
    let answers = all_at_once(&stats, requests).await;

    for answer in &answers[..30] {
        assert_eq!(answer.as_ref().ok(), Some(&false), "{answer:?}");
    }
    for pair in answers[30..40].chunks(2) {
        let mut duplicates: Vec<bool> = pair
            .iter()
            .map(|a| *a.as_ref().expect("a keyed call"))
            .collect();
        duplicates.sort();
        assert_eq!(
            duplicates,
            [false, true],
            "one of a key's calls is the duplicate"
        );
    }
    for answer in &answers[40..] {
        let status = answer.as_ref().expect_err("another user's campaign");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("event.campaign_id"), "{status:?}");
    }
    // Exact totals, in both storages.
    assert_eq!(total_sent(&db).await, 1 + 30 + 5);
    assert_eq!(
        db.scalar("SELECT COALESCE(SUM(sent), 0) FROM campaign_daily_stat_entries")
            .await,
        1 + 30 + 5
    );
    // Far fewer transactions than callers.
    let batches = server
        .metrics()
        .await
        .get("campaign_stats_recorded_batch_events_count")
        - batches_before;
    assert!(batches <= 5.0, "{batches} batches for 43 callers");
    server.stop().await;
}

async fn a_failed_group_fails_each_caller_retryably_and_a_retry_counts_once(db: TestDb) {
    let db = db.in_phase(Phase::DualWrite);
    let server = db
        .start_server_configured(
            &db.url,
            &pool(),
            grouping(1_000, Duration::from_millis(100), 1_000),
        )
        .await;
    let mut stats = server.stats().await;
    stats
        .record_event(sent("u1", "c1", "first"))
        .await
        .expect("the legacy row exists");
    // Another writer holds what the group needs, past the statement timeout.
    let held = db.hold_writes_to_c1().await;
    let keyed: Vec<RecordEventRequest> =
        (0..8).map(|i| sent("u1", "c1", &format!("r{i}"))).collect();
    let answers = all_at_once(&stats, keyed.clone()).await;
    for answer in &answers {
        let status = answer.as_ref().expect_err("the group failed");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    drop(held);

    // Every caller retries; each event counts once.
    let answers = all_at_once(&stats, keyed.clone()).await;
    assert!(
        answers.iter().all(|a| a.as_ref().ok() == Some(&false)),
        "{answers:?}"
    );
    let again = all_at_once(&stats, keyed).await;
    assert!(
        again.iter().all(|a| a.as_ref().ok() == Some(&true)),
        "{again:?}"
    );
    assert_eq!(total_sent(&db).await, 1 + 8);
    server.stop().await;
}

async fn a_flood_past_the_queue_is_refused_at_once(db: TestDb) {
    let db = db.in_phase(Phase::DualWrite);
    // Room for four queued events, and a window that keeps them queued while the rest
    // arrive.
    let server = db
        .start_server_configured(
            &db.url,
            &pool(),
            grouping(1_000, Duration::from_millis(500), 4),
        )
        .await;
    let stats = server.stats().await;
    let flood: Vec<RecordEventRequest> = (0..40)
        .map(|i| sent(&format!("u{i}"), &format!("c{i}"), ""))
        .collect();
    let answers = all_at_once(&stats, flood).await;
    let stored = answers.iter().filter(|a| a.is_ok()).count();
    let refused = answers
        .iter()
        .filter(|a| matches!(a, Err(status) if status.code() == Code::ResourceExhausted))
        .count();
    assert_eq!(stored + refused, 40, "{answers:?}");
    assert!((1..=4).contains(&stored), "{stored} stored");
    assert_eq!(total_sent(&db).await, stored as i64);
    // The queue drains: a call after the flood is taken.
    let mut stats = stats;
    stats
        .record_event(sent("late", "late", ""))
        .await
        .expect("room again");
    server.stop().await;
}

async fn shutdown_answers_every_queued_caller(db: TestDb) {
    let db = db.in_phase(Phase::DualWrite);
    // A window far longer than the test: only the shutdown makes the group write.
    let server = db
        .start_server_configured(
            &db.url,
            &pool(),
            grouping(1_000, Duration::from_secs(600), 1_000),
        )
        .await;
    let stats = server.stats().await;
    let requests: Vec<RecordEventRequest> = (0..20)
        .map(|i| sent(&format!("u{i}"), &format!("c{i}"), ""))
        .collect();
    let callers = tokio::spawn({
        let stats = stats.clone();
        async move { all_at_once(&stats, requests).await }
    });
    // Wait until all twenty are queued.
    let mut every = tokio::time::interval(Duration::from_millis(20));
    loop {
        every.tick().await;
        if server
            .metrics()
            .await
            .get("campaign_stats_group_commit_queued_events")
            >= 20.0
        {
            break;
        }
    }
    server.stop().await;
    let answers = callers.await.expect("callers");
    assert!(
        answers.iter().all(|a| a.as_ref().ok() == Some(&false)),
        "{answers:?}"
    );
    assert_eq!(total_sent(&db).await, 20);
}
