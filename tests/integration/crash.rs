//! Nothing acknowledged is lost or counted twice through crashes, deploys and database
//! outages: producers with idempotency keys and retries write while the server process is
//! killed (SIGKILL), stopped (SIGTERM) and restarted, and while its database connections
//! are refused and then black-holed by a proxy. PostgreSQL only: the shared server is never
//! restarted, the proxy stands in for its outages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{EventType, RecordEventsRequest};
use campaign_stats::migration::Phase;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::common::proxy::Proxy;
use crate::common::{Backend, ServerProcess, TestDb, event};

const PRODUCERS: u64 = 6;
const BATCHES: u64 = 40;
const EVENTS_PER_BATCH: u64 = 10;
const TOTAL: u64 = PRODUCERS * BATCHES * EVENTS_PER_BATCH;

/// Sends its batches in order, each until acknowledged, to whichever server `addr` names
/// now; every event has its own idempotency key, so a retry after a lost answer counts once.
async fn produce(
    producer: u64,
    addr: watch::Receiver<SocketAddr>,
    acked: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
) {
    let mut client: Option<(SocketAddr, StatsServiceClient<Channel>)> = None;
    for batch in 0..BATCHES {
        let events: Vec<_> = (0..EVENTS_PER_BATCH)
            .map(|n| {
                let mut event = event(
                    &format!("u{producer}"),
                    &format!("c{producer}-{}", batch % 3),
                    EventType::Sent,
                    1,
                    "2026-05-01",
                );
                event.idempotency_key = format!("{producer}-{batch}-{n}");
                event
            })
            .collect();
        loop {
            let target = *addr.borrow();
            if client.as_ref().is_none_or(|(at, _)| *at != target) {
                let endpoint = Endpoint::from_shared(format!("http://{target}"))
                    .expect("URI")
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(5));
                client = Some((target, StatsServiceClient::new(endpoint.connect_lazy())));
            }
            let (_, stats) = client.as_mut().expect("a client");
            let answer = stats
                .record_events(RecordEventsRequest {
                    events: events.clone(),
                })
                .await;
            match answer {
                Ok(_) => {
                    acked.fetch_add(EVENTS_PER_BATCH, Ordering::SeqCst);
                    break;
                }
                // Any failure: the server is down, restarting, or its database is. Back off
                // a little and retry, on a fresh connection.
                Err(_) => {
                    retries.fetch_add(1, Ordering::SeqCst);
                    client = None;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// Waits until at least `events` are acknowledged.
async fn until_acked(acked: &AtomicU64, events: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < events {
        assert!(
            Instant::now() < deadline,
            "stuck at {} acknowledged",
            acked.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg_attr(
    not(postgres_tests),
    ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_lose_nothing_and_double_nothing_through_kills_restarts_and_outages() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    // Both storages are written (DUAL_WRITE), so both are checked.
    let db = db.in_phase(Phase::DualWrite);
    db.start_server().await.stop().await;
    let (proxy, url) = Proxy::in_front_of(&db.url).await;
    let args = [
        "--db-statement-timeout-ms",
        "1000",
        "--db-acquire-timeout-secs",
        "1",
        "--health-check-interval-ms",
        "100",
    ];
    let start = || ServerProcess::start(&url, &args);

    let server = start().await;
    let (addr, addrs) = watch::channel(server.addr);
    let acked = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (acked, retries) = (Arc::clone(&acked), Arc::clone(&retries));
            tokio::spawn(produce(p, addrs.clone(), acked, retries))
        })
        .collect();

    // A crash: no shutdown, no flush; answers in flight are lost.
    until_acked(&acked, TOTAL / 6).await;
    server.kill().await;
    let server = start().await;
    addr.send_replace(server.addr);

    // A deploy: SIGTERM, a clean exit, a new process.
    until_acked(&acked, TOTAL / 3).await;
    server.stop().await;
    let server = start().await;
    addr.send_replace(server.addr);

    // The database refuses connections, then swallows every byte, then comes back.
    until_acked(&acked, TOTAL / 2).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await; // an outage lasts a while
    proxy.restore();
    until_acked(&acked, 2 * TOTAL / 3).await;
    proxy.freeze();
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the statement timeout
    proxy.thaw();

    for producer in producers {
        producer.await.expect("a producer finished");
    }
    assert_eq!(acked.load(Ordering::SeqCst), TOTAL);
    server.stop().await;
    // The faults were felt: calls failed and were retried.
    let retried = retries.load(Ordering::SeqCst);
    println!("{TOTAL} events acknowledged after {retried} failed attempts");
    assert!(
        retried > 0,
        "no call failed: the faults did not happen under load"
    );

    let counted = |sql: &'static str| db.scalar(sql);
    assert_eq!(
        counted("SELECT COUNT(*) FROM idempotency_keys").await as u64,
        TOTAL,
        "every key stored once"
    );
    assert_eq!(
        counted("SELECT COALESCE(SUM(sent), 0) FROM campaign_day_totals").await as u64,
        TOTAL,
        "the new storage counts every acknowledged event once"
    );
    assert_eq!(
        counted("SELECT COALESCE(SUM(sent), 0) FROM campaign_daily_stat_entries").await as u64,
        TOTAL,
        "the legacy table counts every acknowledged event once"
    );
}
