//! Every database statement is bounded: a call that passes the statement timeout ends with
//! UNAVAILABLE and its transaction is rolled back, whether the database is slow, waits for a
//! lock, or stops answering altogether (issue 8, defect 7).

use std::time::Duration;

use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{EventType, RecordEventRequest, RecordEventResponse};
use campaign_stats::storage::PoolOptions;
use sqlx::Connection;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::proxy::Proxy;
use crate::common::{TestDb, campaign_metrics, event};

crate::on_both_backends!(a_statement_past_the_timeout_is_unavailable_and_rolled_back);

mod postgres_only {
    #[cfg_attr(
        not(postgres_tests),
        ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
    )]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_that_stops_answering_ends_calls_in_flight() {
        if let Some(db) = crate::common::TestDb::create(crate::common::Backend::Postgres).await {
            super::a_database_that_stops_answering_ends_calls_in_flight(db).await;
        }
    }
}

/// A short statement timeout, so that the tests wait little.
fn short_timeouts() -> PoolOptions {
    PoolOptions {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(1),
    }
}

/// Far longer than any bound the service applies here: a call still running by then hangs.
const HANGING: Duration = Duration::from_secs(30);

fn keyed_sent(key: &str) -> RecordEventRequest {
    let mut one = event("u1", "c1", EventType::Sent, 1, "2026-03-01");
    one.idempotency_key = key.into();
    RecordEventRequest { event: Some(one) }
}

/// Records `request`, retrying while the service says it is unavailable (as clients do).
async fn record_retrying(
    stats: &mut StatsServiceClient<Channel>,
    request: RecordEventRequest,
) -> RecordEventResponse {
    for _ in 0..50 {
        match stats.record_event(request.clone()).await {
            Ok(response) => return response.into_inner(),
            Err(status) if status.code() == Code::Unavailable => continue,
            Err(status) => panic!("RecordEvent failed: {status:?}"),
        }
    }
    panic!("the service stayed unavailable")
}

async fn a_statement_past_the_timeout_is_unavailable_and_rolled_back(db: TestDb) {
    let server = db.start_server_with(&db.url, &short_timeouts()).await;
    let mut stats = server.stats().await;
    stats
        .record_event(keyed_sent("first"))
        .await
        .expect("the legacy row exists");

    // Another writer holds what the next write needs (see `hold_writes_to_c1`).
    let held = db.hold_writes_to_c1().await;
    let status = tokio::time::timeout(HANGING, stats.record_event(keyed_sent("blocked")))
        .await
        .expect("the call ends within its statement timeout")
        .expect_err("a statement past its timeout fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(held); // the other writer ends, rolling its transaction back

    // Nothing of the failed call was kept: its retry is stored, and counted once.
    let retried = record_retrying(&mut stats, keyed_sent("blocked")).await;
    assert!(!retried.duplicate, "the timed-out call's key was kept");
    let day = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-01").await;
    assert_eq!(day.sent, 2);
    server.stop().await;
}

async fn a_database_that_stops_answering_ends_calls_in_flight(db: TestDb) {
    let (proxy, via_proxy) = Proxy::in_front_of(&db.url).await;
    let server = db.start_server_with(&via_proxy, &short_timeouts()).await;
    let mut stats = server.stats().await;
    stats
        .record_event(keyed_sent("first"))
        .await
        .expect("a first write");

    // Each new key makes its write pause inside the database for a moment: long enough to
    // stop the database from answering while the call is inside a query.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    sqlx::raw_sql(
        "CREATE FUNCTION pause() RETURNS trigger AS $$ \
         BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER pause BEFORE INSERT ON idempotency_keys \
         FOR EACH ROW EXECUTE FUNCTION pause()",
    )
    .execute(&mut admin)
    .await
    .expect("a pausing trigger");

    let mut in_flight = stats.clone();
    let call = tokio::spawn(async move { in_flight.record_event(keyed_sent("frozen")).await });
    // Wait until the call is inside its query, then stop the database from answering.
    let mut inside = false;
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < give_up {
        let pausing: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' \
             AND application_name = 'campaign-stats'",
        )
        .fetch_one(&mut admin)
        .await
        .expect("activity");
        if pausing > 0 {
            inside = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(inside, "the call never reached its query");
    proxy.freeze();
    let status = tokio::time::timeout(HANGING, call)
        .await
        .expect("a call in flight ends while the database does not answer")
        .expect("call task")
        .expect_err("it fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    proxy.thaw();
    // The call was not acknowledged, and its transaction never committed: a retry stores it.
    let retried = record_retrying(&mut stats, keyed_sent("frozen")).await;
    assert!(!retried.duplicate, "the timed-out call's key was kept");
    let day = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-01").await;
    assert_eq!(day.sent, 2);
    server.stop().await;
}
