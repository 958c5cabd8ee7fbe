//! The server as a whole: health, reflection, the services not implemented yet, and the
//! `migrate` command.

use std::time::Duration;

use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
use campaign_stats::grpc::proto::{EventType, RecordEventRequest, WatchRolloutRequest};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::proxy::Proxy;
use crate::common::{Backend, TestDb, campaign_metrics, event};

crate::on_both_backends!(
    shutdown_tells_watchers_and_closes_open_streams,
    shutdown_ends_open_rollout_watches_with_unavailable,
    health_is_serving_with_a_database,
    reflection_v1_and_v1alpha_list_every_service,
    migrate_command_creates_the_schema,
);

async fn health_is_serving_with_a_database(db: TestDb) {
    let server = db.start_server().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "stats.v1.StatsService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    server.stop().await;
}

async fn reflection_v1_and_v1alpha_list_every_service(db: TestDb) {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = db.start_server().await;
    let expected = [
        "stats.v1.StatsService",
        "stats.v1.RolloutService",
        "stats.v1.MigrationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1")
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses
            .next()
            .await
            .expect("a v1 answer")
            .expect("v1 answer")
            .message_response
    else {
        panic!("v1 reflection did not list services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in expected {
        assert!(
            names.iter().any(|n| n == service),
            "v1 lists {names:?}, not {service}"
        );
    }

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let requests = [
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        },
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "stats.v1.StatsService".into(),
                ),
            ),
        },
    ];
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("v1alpha")
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses
            .next()
            .await
            .expect("a v1alpha answer")
            .expect("v1alpha answer")
            .message_response
    else {
        panic!("v1alpha reflection did not list services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in expected {
        assert!(
            names.iter().any(|n| n == service),
            "v1alpha lists {names:?}, not {service}"
        );
    }
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        responses
            .next()
            .await
            .expect("a second answer")
            .expect("descriptor")
            .message_response
    else {
        panic!("v1alpha reflection did not describe StatsService");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    server.stop().await;
}

async fn migrate_command_creates_the_schema(db: TestDb) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_campaign-stats"))
        .args(["migrate", "--database-url", &db.url])
        .output()
        .await
        .expect("run campaign-stats migrate");
    assert!(
        output.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tables: Vec<String> = match db.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.expect("open");
            let tables = sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
                .fetch_all(&pool)
                .await
                .expect("tables");
            pool.close().await;
            tables
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
            let tables = sqlx::query_scalar(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'",
            )
            .fetch_all(&pool)
            .await
            .expect("tables");
            pool.close().await;
            tables
        }
    };
    for table in [
        "campaigns",
        "events",
        "idempotency_keys",
        "campaign_day_totals",
        "all_day_totals",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
    // Running it again changes nothing and succeeds.
    let again = tokio::process::Command::new(env!("CARGO_BIN_EXE_campaign-stats"))
        .args(["migrate", "--database-url", &db.url])
        .output()
        .await
        .expect("run migrate again");
    assert!(again.status.success());
}

/// Waits (at most 30 s) until the health watch reports `wanted`.
async fn wait_for_health(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    wanted: ServingStatus,
) {
    let deadline = Duration::from_secs(30);
    tokio::time::timeout(deadline, async {
        while let Some(update) = watch.next().await {
            if update.expect("health update").status == wanted as i32 {
                return;
            }
        }
        panic!("the health watch ended");
    })
    .await
    .unwrap_or_else(|_| panic!("health did not become {wanted:?} within {deadline:?}"));
}

/// PostgreSQL only: the database is reached through a proxy that the test cuts, so the
/// server loses it for real while running.
#[cfg_attr(
    not(postgres_tests),
    ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_health_follows_the_database() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let (proxy, url) = Proxy::in_front_of(&db.url).await;
    let server = db.start_server_at(&url).await;
    let mut client = server.stats().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    wait_for_health(&mut watch, ServingStatus::Serving).await;

    proxy.cut();
    wait_for_health(&mut watch, ServingStatus::NotServing).await;
    // Liveness stays SERVING: restarting the replica would cure no database outage.
    let alive = health
        .check(HealthCheckRequest {
            service: campaign_stats::health::LIVENESS.into(),
        })
        .await
        .expect("liveness")
        .into_inner()
        .status;
    assert_eq!(alive, ServingStatus::Serving as i32);
    let record = || RecordEventRequest {
        event: Some(event("u1", "c1", EventType::Sent, 1, "2026-01-01")),
    };
    let status = client
        .record_event(record())
        .await
        .expect_err("no database");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        !status.message().contains("127.0.0.1"),
        "internal details leaked: {status:?}"
    );

    proxy.restore();
    wait_for_health(&mut watch, ServingStatus::Serving).await;
    client
        .record_event(record())
        .await
        .expect("the database is back");
    assert_eq!(
        campaign_metrics(&mut client, "u1", "c1", "2026-01-01", "2026-01-01")
            .await
            .sent,
        1
    );
    drop(watch);
    server.stop().await;
}

/// PostgreSQL only: pooled connections are handed out without a ping while in use (a round
/// trip saved on every call), but one idle for `PING_IF_IDLE_FOR` is pinged first, so that
/// connections the database dropped during a quiet spell (a restart, a failover) cost no call.
/// On the store itself: a server's health checks would use up the dropped connections first.
#[cfg_attr(
    not(postgres_tests),
    ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_dropped_in_a_quiet_spell_cost_no_call() {
    use campaign_stats::storage::{Database, PoolOptions, PostgresStore};
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let (proxy, url) = Proxy::in_front_of(&db.url).await;
    let store = PostgresStore::connect(&url, &PoolOptions::default())
        .await
        .expect("PostgreSQL through the proxy");
    store.ping().await.expect("the database is there");
    // sqlx hands a connection back to the pool after a check of its own: wait until it is
    // there, idle, so that the cut below drops a pooled connection, not one in that check.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !store.pool_use().iter().any(|p| p.idle >= 1) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the connection back in the pool");

    // The pooled connection is dropped under the store, as a database restart does, while
    // no call comes (not a wait for readiness: the quiet spell is what is tested); then the
    // database is reachable again.
    proxy.cut();
    tokio::time::sleep(PoolOptions::PING_IF_IDLE_FOR * 2).await;
    proxy.restore();

    store
        .ping()
        .await
        .expect("a dropped connection is found by its ping and replaced, not used");
}

async fn shutdown_tells_watchers_and_closes_open_streams(db: TestDb) {
    let server = db.start_server().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    wait_for_health(&mut watch, ServingStatus::Serving).await;
    // The watch stays open: the server must still stop, after its grace period at most.
    let stopping = tokio::spawn(server.stop());
    wait_for_health(&mut watch, ServingStatus::NotServing).await;
    stopping.await.expect("the server stopped");
}

/// A `WatchRollout` open at shutdown ends at once with UNAVAILABLE saying why, so that its
/// client watches again elsewhere instead of holding the server until its grace period ends.
async fn shutdown_ends_open_rollout_watches_with_unavailable(db: TestDb) {
    let server = db.start_server().await;
    let mut rollout = RolloutServiceClient::new(server.channel().await);
    let mut watch = rollout
        .watch_rollout(WatchRolloutRequest {})
        .await
        .expect("watch")
        .into_inner();
    watch
        .message()
        .await
        .expect("the current rollout")
        .expect("an item");
    let stopping = tokio::spawn(server.stop());
    let ended = watch
        .message()
        .await
        .expect_err("the watch ends with an error");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    stopping.await.expect("the server stopped");
}

/// PostgreSQL only: raw events land in the monthly partition of their `occurred_at`, made on
/// demand for any month, so that no write fails for want of a partition.
#[cfg_attr(
    not(postgres_tests),
    ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_events_land_in_monthly_partitions() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    // A phase that writes the new storage.
    let db = db.in_phase(campaign_stats::migration::Phase::NewPrimary);
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let events = vec![
        event("u1", "c1", EventType::Sent, 1, "2003-02-14"),
        event("u1", "c1", EventType::Sent, 1, "2003-02-28"),
        event("u1", "c1", EventType::Sent, 1, "2019-07-01"),
    ];
    client
        .record_events(campaign_stats::grpc::proto::RecordEventsRequest { events })
        .await
        .expect("events in months without a partition yet");
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    let placement: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("partitions");
    assert_eq!(
        placement,
        [
            ("events_p2003_02".to_owned(), 2),
            ("events_p2019_07".to_owned(), 1)
        ]
    );
    pool.close().await;
    assert_eq!(
        campaign_metrics(&mut client, "u1", "c1", "2003-01-01", "2012-12-31")
            .await
            .sent,
        2
    );
    server.stop().await;
}

/// PostgreSQL only: every connection of the server's pool has Nagle's algorithm off (sqlx
/// 0.9.0 leaves it on, and a large write then waits 40 ms for a delayed ACK).
#[cfg_attr(
    not(postgres_tests),
    ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_send_without_delay() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let server = db.start_server().await;
    // A write and a read, so that the pool holds connections.
    let mut stats = server.stats().await;
    stats
        .record_event(RecordEventRequest {
            event: Some(event("u1", "c1", EventType::Sent, 1, "2026-03-01")),
        })
        .await
        .expect("a write");
    let server_port = url::Url::parse(&db.url)
        .expect("database URL")
        .port()
        .unwrap_or(5432);
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .expect("connect");
    let ports: Vec<i32> = sqlx::query_scalar(
        "SELECT client_port FROM pg_stat_activity \
         WHERE application_name = 'campaign-stats' AND datname = current_database()",
    )
    .fetch_all(&mut admin)
    .await
    .expect("the server's connections");
    assert!(!ports.is_empty(), "the server's connections");
    for port in ports {
        let nodelay = socket_between(u16::try_from(port).expect("a port"), server_port)
            .expect("the server's socket, in this process");
        assert!(
            nodelay,
            "Nagle's algorithm is on for the connection from port {port}"
        );
    }
    server.stop().await;
}

/// Whether this process's TCP socket from `local` to `peer` has `TCP_NODELAY` set.
fn socket_between(local: u16, peer: u16) -> Option<bool> {
    use std::os::fd::{BorrowedFd, RawFd};
    let port = |address: std::io::Result<socket2::SockAddr>| {
        address.ok().and_then(|a| a.as_socket()).map(|a| a.port())
    };
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<RawFd>().ok())
        .find_map(|fd| {
            // SAFETY: borrowed for these calls only; a descriptor closed meanwhile fails them.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let socket = socket2::SockRef::from(&fd);
            (port(socket.local_addr()) == Some(local) && port(socket.peer_addr()) == Some(peer))
                .then(|| socket.tcp_nodelay().ok())
                .flatten()
        })
}
