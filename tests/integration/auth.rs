//! Bearer tokens with roles: every RPC refuses callers without the right one, audit entries
//! name the token, the tokens file is re-read on SIGHUP, and a server that anyone could reach
//! refuses to start open.

use std::path::PathBuf;

use campaign_stats::domain::token_sha256_hex;
use campaign_stats::grpc::proto::{GetAggregatedDailyStatsRequest, KillSwitchRequest};
use campaign_stats::server::{Application, AuthSettings, LaunchError, ServerConfig};
use campaign_stats::storage::{PoolOptions, SqliteStore};
use prost::Message;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::api::TESTER;
use crate::common::{ServerProcess, TestDb, TestServer};

crate::on_both_backends!(
    every_rpc_answers_each_caller_by_role,
    audit_entries_name_the_token_not_the_typed_actor,
    the_tokens_file_is_reread_on_sighup,
    the_cli_calls_with_its_token,
);

const ADMIN: &str = "admin-secret-1";
const READER: &str = "reader-secret-2";
const WRITER: &str = "writer-secret-3";

/// A tokens file naming `ops` (admin), `dash` (reader) and `ingest` (writer).
fn tokens_file(dir: &tempfile::TempDir, tokens: &[(&str, &str, &str)]) -> PathBuf {
    let path = dir.path().join("tokens");
    let text: String = tokens
        .iter()
        .map(|(role, name, token)| format!("{role} {name} {}\n", token_sha256_hex(token)))
        .collect();
    std::fs::write(&path, format!("# role name sha256\n{text}")).expect("write tokens");
    path
}

fn all_tokens(dir: &tempfile::TempDir) -> PathBuf {
    tokens_file(
        dir,
        &[
            ("admin", "ops", ADMIN),
            ("reader", "dash", READER),
            ("writer", "ingest", WRITER),
        ],
    )
}

async fn start_with_tokens(db: &TestDb, tokens_file: PathBuf) -> TestServer {
    let config = ServerConfig {
        auth: Some(AuthSettings { tokens_file }),
        ..TestServer::config()
    };
    db.start_server_configured(&db.url, &PoolOptions::default(), config)
        .await
}

/// `request` carrying `authorization: Bearer <token>`.
fn with_token<T>(mut request: Request<T>, token: &str) -> Request<T> {
    let value = format!("Bearer {token}").parse().expect("ASCII");
    request.metadata_mut().insert("authorization", value);
    request
}

/// Calls `path` with one empty message, whatever its kind (unary or streaming: the wire is
/// the same), and returns how the call was answered: `Ok` once response headers came
/// without an error.
async fn call(channel: Channel, path: &str, token: Option<&str>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let mut request = Request::new(tokio_stream::iter([()]));
    if let Some(token) = token {
        request = with_token(request, token);
    }
    let path = path.parse().expect("a path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    grpc.streaming(request, path, codec).await.map(drop)
}

/// Every method the API's descriptors define, as `/package.Service/Method`.
fn api_methods() -> Vec<(String, String)> {
    let set =
        prost_types::FileDescriptorSet::decode(campaign_stats::grpc::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
    let mut methods = Vec::new();
    for file in set.file.iter().filter(|f| f.package() == "stats.v1") {
        for service in &file.service {
            for method in &service.method {
                methods.push((service.name().to_owned(), method.name().to_owned()));
            }
        }
    }
    methods
}

/// The role a call with an empty message needs, as the product contract says (docs/design.md, "The API"):
/// ingest `writer`, reads `reader` (the all-users view, an empty `user_id`, `admin`), the
/// control services `admin`.
fn needed_role(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("StatsService", "RecordEvent" | "RecordEvents" | "StreamEvents") => "writer",
        ("StatsService", "GetAggregatedDailyStats") => "admin",
        ("StatsService", _) => "reader",
        _ => "admin",
    }
}

async fn every_rpc_answers_each_caller_by_role(db: TestDb) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = start_with_tokens(&db, all_tokens(&dir)).await;
    let channel = server.channel().await;
    let methods = api_methods();
    assert!(methods.len() >= 25, "{} methods", methods.len());
    let callers = [
        (None, None),
        (Some("not-a-token"), None),
        (Some(READER), Some("reader")),
        (Some(WRITER), Some("writer")),
        (Some(ADMIN), Some("admin")),
    ];
    for (service, method) in &methods {
        let path = format!("/stats.v1.{service}/{method}");
        let needed = needed_role(service, method);
        for (token, role) in callers {
            let answer = call(channel.clone(), &path, token).await;
            let code = answer.as_ref().err().map(Status::code);
            match role {
                None => assert_eq!(code, Some(Code::Unauthenticated), "{path} with {token:?}"),
                Some(role) if role == needed || role == "admin" => assert!(
                    !matches!(code, Some(Code::Unauthenticated | Code::PermissionDenied)),
                    "{path} as {role}: {answer:?}"
                ),
                Some(role) => {
                    let status = answer.expect_err("a role that may not call");
                    assert_eq!(status.code(), Code::PermissionDenied, "{path} as {role}");
                    // The message names the token's role and what the call needs.
                    let message = status.message();
                    assert!(
                        message.contains(role) && message.contains("needs"),
                        "{message}"
                    );
                }
            }
        }
    }

    // A reader reads one user's series; health and reflection need no token.
    let mut stats = server.stats().await;
    let request = GetAggregatedDailyStatsRequest {
        user_id: "u1".into(),
        start_date: "2026-01-01".into(),
        end_date: "2026-01-02".into(),
        ..Default::default()
    };
    let request = with_token(Request::new(request), READER);
    stats
        .get_aggregated_daily_stats(request)
        .await
        .expect("a reader reads a user");
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is open")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    call(
        channel,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        None,
    )
    .await
    .expect("reflection is open");
    server.stop().await;
}

async fn audit_entries_name_the_token_not_the_typed_actor(db: TestDb) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = start_with_tokens(&db, all_tokens(&dir)).await;
    let request = KillSwitchRequest {
        engaged: true,
        reason: "incident".into(),
        actor: "mallory".into(),
    };
    let request = with_token(Request::new(request), ADMIN);
    server
        .rollout()
        .await
        .kill_switch(request)
        .await
        .expect("an admin engages the kill switch");
    let history = with_token(
        Request::new(campaign_stats::grpc::proto::ListRolloutHistoryRequest::default()),
        ADMIN,
    );
    let changes = server
        .rollout()
        .await
        .list_rollout_history(history)
        .await
        .expect("history")
        .into_inner()
        .changes;
    let actors: Vec<&str> = changes.iter().map(|c| c.actor.as_str()).collect();
    assert_eq!(actors, ["ops"]);
    assert_ne!(actors[0], TESTER);
    server.stop().await;
}

async fn the_tokens_file_is_reread_on_sighup(db: TestDb) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = tokens_file(&dir, &[("admin", "ops", ADMIN)]);
    db.start_server().await.stop().await; // the schema, made once by an in-process server
    let server = ServerProcess::start(
        &db.url,
        &["--auth-tokens-file", file.to_str().expect("UTF-8 path")],
    )
    .await;
    let path = "/stats.v1.RolloutService/GetRollout";
    call(server.channel().await, path, Some(ADMIN))
        .await
        .expect("the first token");

    // A broken file changes nothing.
    std::fs::write(&file, "admin ops not-a-hash\n").expect("break the file");
    server.hang_up().await;
    // The new file replaces the old token with another.
    let next = "admin-secret-next";
    tokens_file(&dir, &[("admin", "ops2", next)]);
    server.hang_up().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let old = call(server.channel().await, path, Some(ADMIN)).await;
        if old.as_ref().err().map(Status::code) == Some(Code::Unauthenticated) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old token still works: {old:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    call(server.channel().await, path, Some(next))
        .await
        .expect("the new token");
    server.stop().await;
}

async fn the_cli_calls_with_its_token(db: TestDb) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = all_tokens(&dir);
    let server = start_with_tokens(&db, file).await;
    let addr = server.addr.to_string();
    let (ok, _, stderr) = crate::cli::cli(&["rollout", "get", "--server", &addr]).await;
    assert!(!ok);
    assert!(stderr.contains("(UNAUTHENTICATED)"), "{stderr}");
    let (ok, _, stderr) =
        crate::cli::cli(&["rollout", "get", "--server", &addr, "--token", READER]).await;
    assert!(!ok);
    assert!(stderr.contains("(PERMISSION_DENIED)"), "{stderr}");
    let (ok, stdout, stderr) = crate::cli::cli(&[
        "rollout",
        "kill-switch",
        "on",
        "--reason",
        "drill",
        "--server",
        &addr,
        "--token",
        ADMIN,
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("kill switch"), "{stdout}");
    server.stop().await;
}

/// Without tokens, a server on an address other hosts reach refuses to start, unless the
/// operator insists; on loopback it starts open.
#[tokio::test]
async fn a_server_anyone_could_reach_does_not_start_open() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("open.db").display());
    let store = || async {
        SqliteStore::connect(&url, &PoolOptions::default())
            .await
            .expect("open SQLite")
    };
    let everywhere = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let refused = Application::build(everywhere, store().await, ServerConfig::default()).await;
    assert!(
        matches!(refused, Err(LaunchError::OpenToTheNetwork(_))),
        "{:?}",
        refused.err()
    );
    let everywhere = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let insisted = ServerConfig {
        insecure_no_auth: true,
        ..ServerConfig::default()
    };
    assert!(
        Application::build(everywhere, store().await, insisted)
            .await
            .is_ok()
    );
    let loopback = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    assert!(
        Application::build(loopback, store().await, ServerConfig::default())
            .await
            .is_ok()
    );
}
