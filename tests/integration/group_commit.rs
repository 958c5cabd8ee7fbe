//! Group commit (issue 10): concurrent `RecordEvent` calls, `RecordEvents` batches and
//! `StreamEvents` chunks share transactions, and each caller still gets its own answer.

use std::time::Duration;

use campaign_stats::app::GroupCommitSettings;
use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{
    EventType, MigrationPhase, RecordEventRequest, RecordEventsRequest, TransitionPhaseRequest,
};
use campaign_stats::migration::Phase;
use campaign_stats::server::ServerConfig;
use campaign_stats::storage::PoolOptions;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{Backend, ServerProcess, TestDb, TestServer, event};

crate::on_both_backends!(
    concurrent_callers_each_get_their_own_answer,
    a_failed_group_fails_each_caller_retryably_and_a_retry_counts_once,
    a_flood_past_the_queue_is_refused_at_once,
    shutdown_answers_every_queued_caller,
    sigterm_writes_what_is_queued_and_answers_every_caller,
    batches_and_single_events_share_the_queue,
    a_batch_past_the_queue_is_refused_at_once,
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

/// A server of `db` whose one flusher writes what queues within `window`, up to 1,000
/// events, with room for `queue_events`.
async fn grouped_server(db: &TestDb, window: Duration, queue_events: usize) -> TestServer {
    db.start_server_configured(&db.url, &pool(), grouping(1_000, window, queue_events))
        .await
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
    let server = grouped_server(&db, Duration::from_millis(300), 1_000).await;
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
    let server = grouped_server(&db, Duration::from_millis(100), 1_000).await;
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
    let server = grouped_server(&db, Duration::from_millis(500), 4).await;
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
    let server = grouped_server(&db, Duration::from_secs(600), 1_000).await;
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

/// Sends each batch as one `RecordEvents` call, all at once; answers `(stored, duplicates)`
/// in request order.
async fn batches_at_once(
    stats: &StatsServiceClient<Channel>,
    batches: Vec<Vec<RecordEventRequest>>,
) -> Vec<Result<(u64, u64), tonic::Status>> {
    let calls: Vec<_> = batches
        .into_iter()
        .map(|batch| {
            let mut stats = stats.clone();
            let events = batch.into_iter().filter_map(|r| r.event).collect();
            tokio::spawn(async move {
                stats
                    .record_events(RecordEventsRequest { events })
                    .await
                    .map(|response| {
                        let response = response.into_inner();
                        (response.stored, response.duplicates)
                    })
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("a call task"));
    }
    answers
}

/// Waits until the queue holds at least `events` events.
async fn until_queued(server: &TestServer, events: f64) {
    let mut every = tokio::time::interval(Duration::from_millis(10));
    loop {
        every.tick().await;
        if server
            .metrics()
            .await
            .get("campaign_stats_group_commit_queued_events")
            >= events
        {
            return;
        }
    }
}

async fn sigterm_writes_what_is_queued_and_answers_every_caller(db: TestDb) {
    // The real binary (which migrates the database itself: LEGACY_ONLY), with one flusher
    // whose group waits the longest window for more.
    let process = ServerProcess::start(
        &db.url,
        &[
            "--group-commit-flushers",
            "1",
            "--group-commit-window-us",
            "1000000",
        ],
    )
    .await;
    let stats = StatsServiceClient::new(process.channel().await);
    let requests: Vec<RecordEventRequest> = (0..20)
        .map(|i| sent(&format!("u{i}"), &format!("q{i}"), ""))
        .collect();
    let callers = tokio::spawn({
        let stats = stats.clone();
        async move { all_at_once(&stats, requests).await }
    });
    let mut every = tokio::time::interval(Duration::from_millis(5));
    while process
        .metrics()
        .await
        .get("campaign_stats_group_commit_queued_events")
        < 20.0
    {
        every.tick().await;
    }
    // SIGTERM with twenty events queued, within their window.
    process.terminate().await;
    let answers = callers.await.expect("callers");
    assert!(
        answers.iter().all(|a| a.as_ref().ok() == Some(&false)),
        "{answers:?}"
    );
    process.exits_cleanly().await;
    assert_eq!(
        db.scalar("SELECT COALESCE(SUM(sent), 0) FROM campaign_daily_stat_entries")
            .await,
        20
    );
}

async fn batches_and_single_events_share_the_queue(db: TestDb) {
    let db = db.in_phase(Phase::DualWrite);
    // A long window, so that the calls below share groups.
    let server = grouped_server(&db, Duration::from_millis(300), 1_000).await;
    let mut stats = server.stats().await;
    stats
        .record_event(sent("owner", "taken", ""))
        .await
        .expect("the campaign gets its owner");

    let singles: Vec<RecordEventRequest> = (0..10)
        .map(|i| sent(&format!("u{}", i % 2), &format!("c{}", i % 2), ""))
        .chain([sent("u0", "c0", "shared")])
        .collect();
    let good: Vec<RecordEventRequest> = (0..5).map(|_| sent("u1", "c1", "")).collect();
    // A key twice in one batch, and a key a single call uses too.
    let keyed = vec![
        sent("u0", "c0", "twice"),
        sent("u0", "c0", "twice"),
        sent("u0", "c0", "shared"),
    ];
    // Its last event is another user's campaign: none of the batch is stored.
    let refused: Vec<RecordEventRequest> = (0..3)
        .map(|_| sent("u1", "c1", ""))
        .chain([sent("u1", "taken", "")])
        .collect();
    let (single_answers, batch_answers) = tokio::join!(
        all_at_once(&stats, singles),
        batches_at_once(&stats, vec![good, keyed, refused])
    );

    assert!(
        single_answers[..10]
            .iter()
            .all(|a| a.as_ref().ok() == Some(&false)),
        "{single_answers:?}"
    );
    let shared_single_duplicate = *single_answers[10].as_ref().expect("a keyed call");
    assert_eq!(batch_answers[0].as_ref().ok(), Some(&(5, 0)));
    let (stored, duplicates) = *batch_answers[1].as_ref().expect("the keyed batch");
    // `twice` counts once; `shared` counts once between the batch and the single call.
    assert_eq!(stored + duplicates, 3);
    assert_eq!(
        duplicates,
        1 + u64::from(!shared_single_duplicate),
        "{batch_answers:?}"
    );
    let status = batch_answers[2]
        .as_ref()
        .expect_err("another user's campaign");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("events[3].campaign_id"),
        "{status:?}"
    );
    // 1 + 10 singles + 5 + 2 keyed (twice, shared) + 0 of the refused batch.
    assert_eq!(total_sent(&db).await, 1 + 10 + 5 + 2);
    assert_eq!(
        db.scalar("SELECT COALESCE(SUM(sent), 0) FROM campaign_daily_stat_entries")
            .await,
        1 + 10 + 5 + 2
    );
    server.stop().await;
}

async fn a_batch_past_the_queue_is_refused_at_once(db: TestDb) {
    let db = db.in_phase(Phase::DualWrite);
    // Room for ten queued events; the window keeps the first batch queued.
    let server = grouped_server(&db, Duration::from_millis(500), 10).await;
    let stats = server.stats().await;
    let first = tokio::spawn({
        let stats = stats.clone();
        let batch = (0..8).map(|i| sent("u1", &format!("c{i}"), "")).collect();
        async move { batches_at_once(&stats, vec![batch]).await }
    });
    until_queued(&server, 8.0).await;
    let refused = batches_at_once(
        &stats,
        vec![(0..5).map(|i| sent("u2", &format!("d{i}"), "")).collect()],
    )
    .await;
    let status = refused[0].as_ref().expect_err("no room for five more");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let first = first.await.expect("the first batch");
    assert_eq!(first[0].as_ref().ok(), Some(&(8, 0)));
    assert_eq!(total_sent(&db).await, 8);
    server.stop().await;
}

/// PostgreSQL only (SQLite's one writer serialises every write with a transition anyway): a
/// write holds the phase it planned for until it commits, so a transition waits for the
/// writes in flight, and no write lands in a phase it did not plan for.
#[cfg_attr(
    not(postgres_tests),
    ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_transition_waits_for_the_writes_in_flight() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let db = db.in_phase(Phase::DualWrite);
    let patient = PoolOptions {
        statement_timeout: Duration::from_secs(30),
        ..pool()
    };
    let server = db
        .start_server_configured(&db.url, &patient, TestServer::config())
        .await;
    let mut stats = server.stats().await;
    stats
        .record_event(sent("u1", "c1", "first"))
        .await
        .expect("the legacy row exists");
    // The next write to c1 plans for DUAL_WRITE, then waits on the held legacy row.
    let held = db.hold_writes_to_c1().await;
    let write = tokio::spawn({
        let mut stats = stats.clone();
        async move { stats.record_event(sent("u1", "c1", "in flight")).await }
    });
    wait_for_lock(&db, "WITH new_events AS (INSERT INTO events%").await;
    let transition = tokio::spawn({
        let mut migration = MigrationServiceClient::new(server.channel().await);
        async move {
            migration
                .transition_phase(TransitionPhaseRequest {
                    force: false,
                    target: MigrationPhase::LegacyOnly.into(),
                    reason: "back out".into(),
                    actor: "tester".into(),
                })
                .await
        }
    });
    // The transition waits for the write's share of the phase row.
    wait_for_lock(&db, "%FROM migration_state%FOR UPDATE%").await;
    assert!(!transition.is_finished() && !write.is_finished());
    drop(held);
    write
        .await
        .expect("the write")
        .expect("the write commits in DUAL_WRITE");
    transition
        .await
        .expect("the transition")
        .expect("then the transition");
    // The write committed as planned: in the new storage and in legacy.
    assert_eq!(total_sent(&db).await, 2);
    // A write after the transition plans for LEGACY_ONLY: legacy only.
    stats
        .record_event(sent("u1", "c1", "after"))
        .await
        .expect("a write in LEGACY_ONLY");
    assert_eq!(total_sent(&db).await, 2);
    assert_eq!(
        db.scalar("SELECT COALESCE(SUM(sent), 0) FROM campaign_daily_stat_entries")
            .await,
        3
    );
    server.stop().await;
}

/// Waits until a session of `db` waits on a lock in a statement like `pattern` (which sees
/// only the statement's first 1,024 bytes, as `pg_stat_activity` keeps them); panics if none
/// does within ten seconds.
async fn wait_for_lock(db: &TestDb, pattern: &str) {
    let sql = format!(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND query LIKE '{pattern}'"
    );
    let waiting = async {
        let mut every = tokio::time::interval(Duration::from_millis(10));
        loop {
            every.tick().await;
            if db.scalar(&sql).await > 0 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| panic!("no statement like {pattern:?} waited on a lock"));
}
