//! A replica under more than it should take: calls past the concurrency limit are turned
//! away at once (and health still answers), connections past the limit are closed, calls
//! past their deadline end, and silent ingest streams are closed and their memory returned.

use std::time::{Duration, Instant};

use campaign_stats::grpc::Limits;
use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{EventType, RecordEventRequest};
use campaign_stats::migration::Phase;
use campaign_stats::server::ServerConfig;
use campaign_stats::storage::PoolOptions;
use futures::future::join_all;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use crate::common::{ServerProcess, TestDb, TestServer, connect, event};

crate::on_both_backends!(
    calls_past_the_limit_are_shed_while_health_answers,
    connections_past_the_limit_are_closed,
    silent_streams_are_closed_and_their_memory_returned,
);

/// A call is made slow by a row lock another writer holds: PostgreSQL waits for it, while
/// SQLite refuses a write under another writer's lock at once (UNAVAILABLE), so there is no
/// slow call to end there.
mod postgres_only {
    #[cfg_attr(
        not(postgres_tests),
        ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
    )]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_end_at_the_server_limit_or_the_client_deadline() {
        if let Some(db) = crate::common::TestDb::create(crate::common::Backend::Postgres).await {
            super::calls_end_at_the_server_limit_or_the_client_deadline(db).await;
        }
    }
}

async fn start_limited(db: &TestDb, limits: Limits) -> TestServer {
    let config = ServerConfig {
        limits,
        ..TestServer::config()
    };
    db.start_server_configured(&db.url, &PoolOptions::default(), config)
        .await
}

fn sent(user: &str, campaign: &str, key: &str) -> RecordEventRequest {
    let mut event = event(user, campaign, EventType::Sent, 1, "2026-03-01");
    event.idempotency_key = key.into();
    RecordEventRequest { event: Some(event) }
}

/// A `StreamEvents` call kept open until its sender is dropped.
fn open_stream(
    stats: &StatsServiceClient<Channel>,
) -> (
    mpsc::Sender<RecordEventRequest>,
    tokio::task::JoinHandle<Result<u64, Status>>,
) {
    let (sender, receiver) = mpsc::channel(4);
    let mut stats = stats.clone();
    let call = tokio::spawn(async move {
        stats
            .stream_events(ReceiverStream::new(receiver))
            .await
            .map(|response| response.into_inner().stored)
    });
    (sender, call)
}

async fn calls_past_the_limit_are_shed_while_health_answers(db: TestDb) {
    let server = start_limited(
        &db,
        Limits {
            max_concurrent_calls: 3,
            ..Limits::DEFAULT
        },
    )
    .await;
    let stats = server.stats().await;
    let open = |i: usize| {
        let (sender, call) = open_stream(&stats);
        sender
            .try_send(sent(&format!("u{i}"), &format!("c{i}"), ""))
            .expect("room for one event");
        (sender, call)
    };
    let mut held: Vec<_> = (0..3).map(open).collect();
    // Wait until the three streams hold every place: a probe is refused then, as only these
    // three calls and the probe ever ask. A stream that arrived while a probe held a place
    // was refused itself: it is opened again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        for (i, slot) in held.iter_mut().enumerate() {
            if slot.1.is_finished() {
                let (_, call) = std::mem::replace(slot, open(i));
                let status = call
                    .await
                    .expect("join")
                    .expect_err("only refused streams end");
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            }
        }
        let answer = stats.clone().record_event(sent("u9", "c9", "probe")).await;
        match answer {
            Err(status) if status.code() == Code::ResourceExhausted => break status,
            _ => assert!(Instant::now() < deadline, "never at the limit: {answer:?}"),
        }
        tokio::task::yield_now().await;
    };
    assert!(
        refused.message().contains("limit of 3 calls"),
        "{refused:?}"
    );
    assert!(refused.metadata().get("grpc-retry-pushback-ms").is_some());
    assert!(refused.get_details_retry_info().is_some(), "{refused:?}");

    // A flood is turned away at once, every call of it, while health answers.
    let flood = (0..20).map(|i| {
        let mut stats = stats.clone();
        async move { stats.record_event(sent("u8", "c8", &format!("f{i}"))).await }
    });
    for answer in join_all(flood).await {
        assert_eq!(
            answer.expect_err("past the limit").code(),
            Code::ResourceExhausted
        );
    }
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers at the limit");

    // The held streams finish normally, and the places come back.
    for (sender, call) in held {
        drop(sender);
        assert_eq!(call.await.expect("join").expect("the stream succeeds"), 1);
    }
    stats
        .clone()
        .record_event(sent("u9", "c9", "after"))
        .await
        .expect("a place is free again");
    server.stop().await;
}

async fn connections_past_the_limit_are_closed(db: TestDb) {
    let server = start_limited(
        &db,
        Limits {
            max_connections: 2,
            ..Limits::DEFAULT
        },
    )
    .await;
    let check = |channel: Channel| async move {
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
    };
    let first = connect(server.addr).await;
    let second = connect(server.addr).await;
    check(first.clone()).await.expect("the first connection");
    check(second.clone()).await.expect("the second connection");
    let third = check(connect(server.addr).await).await;
    assert!(third.is_err(), "a third connection was served: {third:?}");

    // Once one closes, a new connection is served.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if check(connect(server.addr).await).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no place after a connection closed"
        );
        tokio::task::yield_now().await;
    }
    check(second)
        .await
        .expect("the second connection still serves");
    server.stop().await;
}

async fn calls_end_at_the_server_limit_or_the_client_deadline(db: TestDb) {
    let db = db.in_phase(Phase::DualWrite);
    let server = start_limited(
        &db,
        Limits {
            max_call_duration: Duration::from_millis(300),
            ..Limits::DEFAULT
        },
    )
    .await;
    let mut stats = server.stats().await;
    stats
        .record_event(sent("u1", "c1", "first"))
        .await
        .expect("the legacy row exists");
    let held = db.hold_writes_to_c1().await;
    let status = stats
        .record_event(sent("u1", "c1", "slow"))
        .await
        .expect_err("past the server's limit");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("300ms"), "{status:?}");
    let mut request = Request::new(sent("u1", "c1", "slower"));
    request.set_timeout(Duration::from_millis(100));
    let status = stats
        .record_event(request)
        .await
        .expect_err("past the client's deadline");
    // The server ends it at the `grpc-timeout` it was sent (DEADLINE_EXCEEDED); tonic's own
    // client may give up first (CANCELLED, "Timeout expired"), whichever comes first.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    drop(held);

    // Retried with their keys, both count once, whatever became of the first tries.
    for key in ["slow", "slower"] {
        stats
            .record_event(sent("u1", "c1", key))
            .await
            .expect("the retry");
    }
    let sent_total = db
        .scalar("SELECT SUM(sent) FROM campaign_day_totals WHERE campaign_id = 'c1'")
        .await;
    assert_eq!(sent_total, 3);
    server.stop().await;
}

async fn silent_streams_are_closed_and_their_memory_returned(db: TestDb) {
    db.start_server().await.stop().await; // the schema, made once
    let server = ServerProcess::start(
        &db.url,
        &[
            "--stream-idle-timeout-ms",
            "1500",
            "--max-concurrent-calls",
            "2000",
        ],
    )
    .await;
    let baseline = server.resident_bytes();
    // 500 streams that never send, over five connections (up to 128 calls each).
    let mut streams = Vec::new();
    let mut senders = Vec::new();
    for connection in 0..5 {
        let stats = StatsServiceClient::new(server.channel().await);
        for _ in 0..100 {
            let (sender, call) = open_stream(&stats);
            senders.push(sender);
            streams.push(call);
        }
        let _ = connection;
    }
    // Another caller is served while they sit there.
    let mut other = StatsServiceClient::new(server.channel().await);
    other
        .record_event(sent("u1", "c1", "other"))
        .await
        .expect("another caller is served");
    let mut closed = 0;
    for call in streams {
        let status = call.await.expect("join").expect_err("closed for silence");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert_eq!(
            status
                .metadata()
                .get("x-stored-count")
                .map(|v| v.to_str().unwrap()),
            Some("0")
        );
        closed += 1;
    }
    assert_eq!(closed, 500);
    drop(senders);
    let after = server.resident_bytes();
    println!(
        "resident memory: {} MiB at start, {} MiB after 500 silent streams were closed",
        baseline >> 20,
        after >> 20
    );
    assert!(
        after < baseline + (32 << 20),
        "the server kept {} MiB after the streams closed",
        (after - baseline) >> 20
    );
    other
        .record_event(sent("u1", "c1", "later"))
        .await
        .expect("still served");
    server.stop().await;
}
