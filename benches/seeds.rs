//! The seeds' scale (issue 9): a legacy table shaped like seed 000's, the service's own
//! backfill and verify, and the same reads on both storages, measured in one run beside what
//! the database itself does (one set-based `INSERT … SELECT` of the same non-zero rows).
//!
//! ```sh
//! STATS_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench seeds
//! cargo bench --bench seeds -- --quick --sqlite --json seeds.json
//! ```
//!
//! Prints one markdown table; asserts nothing (`--quick` only proves the benchmark works).

use std::time::{Duration, Instant};

use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{
    AmbiguousResolution, GetAggregatedDailyStatsRequest, GetStatsForCampaignsRequest,
    GetStatsRequest, GetStorageReportRequest, Granularity, MigrationPhase,
    ResolveAmbiguousRowsRequest, SetUserOverrideRequest, StartBackfillRequest, StorageSource,
    TransitionPhaseRequest, VerifyConsistencyRequest, WatchRunRequest,
};
use campaign_stats::server::{ServerConfig, launch};
use campaign_stats::storage::{PoolOptions, PostgresStore, SqliteStore, Store};
use serde_json::json;
use sqlx::Connection;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// The size of the generated history.
#[derive(Debug, Clone, Copy)]
struct Scale {
    campaigns: u32,
    days: u32,
    /// Campaigns per user; the first user owns [`BIG_USER_CAMPAIGNS`].
    per_user: u32,
}

/// Seed 000's table: 7,200 campaigns over a year, 2,628,000 rows (and a few that look wrong).
const FULL: Scale = Scale {
    campaigns: 7_200,
    days: 365,
    per_user: 12,
};
const QUICK: Scale = Scale {
    campaigns: 240,
    days: 60,
    per_user: 12,
};
/// Campaigns of the first user, for the 100-campaign read.
const BIG_USER_CAMPAIGNS: u32 = 120;
/// A user of `per_user` campaigns at both scales, and one of its campaigns.
const ONE_USER: &str = "user-0010";
const ONE_CAMPAIGN: &str = "campaign-00130";
/// Calls per storage per read, taken in alternating blocks.
const ROUNDS: usize = 6;
const BLOCK: usize = 10;

/// The nine indexes a real legacy deployment carries (primary key and unique key included).
const LEGACY_INDEXES: [&str; 7] = [
    "CREATE INDEX legacy_by_user ON campaign_daily_stat_entries (user_id)",
    "CREATE INDEX legacy_by_date ON campaign_daily_stat_entries (stat_date)",
    "CREATE INDEX legacy_by_campaign ON campaign_daily_stat_entries (campaign_id)",
    "CREATE INDEX legacy_by_user_date ON campaign_daily_stat_entries (user_id, stat_date)",
    "CREATE INDEX legacy_by_user_campaign ON campaign_daily_stat_entries (user_id, campaign_id)",
    "CREATE INDEX legacy_by_created ON campaign_daily_stat_entries (created_at)",
    "CREATE INDEX legacy_by_updated ON campaign_daily_stat_entries (updated_at)",
];

/// Rows that look wrong, reported by the backfill as ambiguous.
const WRONG_ROWS: &str = "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, \
    stat_date, sent, opened, replied, positive_replies, bounced) VALUES \
    ('bad-1', 'user-bad', '2025-02-01', -3, 0, 0, 0, 0), \
    ('bad-2', 'user-bad', '2025-02-01', 1, NULL, 0, 0, 0), \
    ('bad-3', 'user-bad', '2025-02-01', 5, 0, 1, 2, 0), \
    ('bad-4', 'user-bad', '2025-02-01', 4, 0, 0, 0, 0), \
    ('bad-4', 'user-other', '2025-02-02', 4, 0, 0, 0, 0)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Postgres,
    Sqlite,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scale = if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    let backend = if args.iter().any(|a| a == "--sqlite") {
        Backend::Sqlite
    } else {
        Backend::Postgres
    };
    let json_file = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.path().join("seeds.db").display()),
            Backend::Postgres => match std::env::var("STATS_TEST_POSTGRES_URL") {
                Ok(server) if !server.is_empty() => fresh_postgres_database(&server).await,
                _ => {
                    println!("set STATS_TEST_POSTGRES_URL, or pass --sqlite");
                    return;
                }
            },
        };
        let figures = run(backend, &url, scale).await;
        print_table(backend, scale, &figures);
        if let Some(file) = json_file {
            std::fs::write(&file, serde_json::to_string_pretty(&figures).expect("JSON"))
                .expect("write the JSON");
            println!("\nfigures written to {file}");
        }
    });
}

async fn fresh_postgres_database(server_url: &str) -> String {
    let mut admin = sqlx::PgConnection::connect(server_url)
        .await
        .expect("reach PostgreSQL");
    for sql in [
        "DROP DATABASE IF EXISTS cs_seeds WITH (FORCE)",
        "CREATE DATABASE cs_seeds",
    ] {
        sqlx::query(sql).execute(&mut admin).await.expect(sql);
    }
    let mut url = url::Url::parse(server_url).expect("PostgreSQL URL");
    url.set_path("cs_seeds");
    url.to_string()
}

/// Runs `sql` statements on the database at `url`, returning how long the last one took.
async fn execute(backend: Backend, url: &str, statements: &[String]) -> Duration {
    let mut took = Duration::ZERO;
    match backend {
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
            for sql in statements {
                let started = Instant::now();
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                    .execute(&mut connection)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                took = started.elapsed();
            }
        }
        Backend::Sqlite => {
            let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url)
                .expect("URL")
                .create_if_missing(true);
            let mut connection = sqlx::SqliteConnection::connect_with(&options)
                .await
                .expect("open");
            for sql in statements {
                let started = Instant::now();
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                    .execute(&mut connection)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                took = started.elapsed();
            }
        }
    }
    took
}

/// The legacy table as the legacy system made it, filled with `scale`'s history: 93% of the
/// rows all zeros, a few legitimately huge days, and rows that look wrong.
fn legacy_history(backend: Backend, scale: Scale) -> Vec<String> {
    let (table, rows) = match backend {
        Backend::Postgres => (
            "CREATE TABLE campaign_daily_stat_entries (id BIGSERIAL PRIMARY KEY, \
             campaign_id TEXT NOT NULL, user_id TEXT NOT NULL, stat_date DATE NOT NULL, \
             sent INTEGER DEFAULT 0, opened INTEGER DEFAULT 0, replied INTEGER DEFAULT 0, \
             positive_replies INTEGER DEFAULT 0, bounced INTEGER DEFAULT 0, \
             created_at TIMESTAMPTZ NOT NULL DEFAULT now(), \
             updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), UNIQUE (campaign_id, stat_date))"
                .to_owned(),
            format!(
                "SELECT 'campaign-' || lpad(c::text, 5, '0') AS campaign, \
                 'user-' || lpad((CASE WHEN c < {big} THEN 0 ELSE c / {per} END)::text, 4, '0') \
                 AS owner, DATE '2025-01-01' + d AS day, c, d \
                 FROM generate_series(0, {campaigns} - 1) c, generate_series(0, {days} - 1) d",
                big = BIG_USER_CAMPAIGNS,
                per = scale.per_user,
                campaigns = scale.campaigns,
                days = scale.days
            ),
        ),
        Backend::Sqlite => (
            "CREATE TABLE campaign_daily_stat_entries (id INTEGER PRIMARY KEY, \
             campaign_id TEXT NOT NULL, user_id TEXT NOT NULL, stat_date TEXT NOT NULL, \
             sent INTEGER DEFAULT 0, opened INTEGER DEFAULT 0, replied INTEGER DEFAULT 0, \
             positive_replies INTEGER DEFAULT 0, bounced INTEGER DEFAULT 0, \
             created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, \
             updated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, UNIQUE (campaign_id, stat_date))"
                .to_owned(),
            format!(
                "WITH RECURSIVE cs(c) AS (SELECT 0 UNION ALL SELECT c + 1 FROM cs \
                 WHERE c < {campaigns} - 1), ds(d) AS (SELECT 0 UNION ALL SELECT d + 1 FROM ds \
                 WHERE d < {days} - 1) \
                 SELECT printf('campaign-%05d', c) AS campaign, \
                 printf('user-%04d', CASE WHEN c < {big} THEN 0 ELSE c / {per} END) AS owner, \
                 date('2025-01-01', '+' || d || ' days') AS day, c, d FROM cs, ds",
                big = BIG_USER_CAMPAIGNS,
                per = scale.per_user,
                campaigns = scale.campaigns,
                days = scale.days
            ),
        ),
    };
    // 7% of rows active; every 997th active row a big campaign's day.
    let fill = format!(
        "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, stat_date, sent, \
         opened, replied, positive_replies, bounced) \
         SELECT campaign, owner, day, \
         CASE WHEN (c * 7919 + d * 104729) % 100 >= 7 THEN 0 \
              WHEN (c * 31 + d * 17) % 997 = 0 THEN 5000000 \
              ELSE 20 + (c * 31 + d * 17) % 400 END, \
         CASE WHEN (c * 7919 + d * 104729) % 100 >= 7 THEN 0 ELSE 10 + (c + d) % 150 END, \
         CASE WHEN (c * 7919 + d * 104729) % 100 >= 7 THEN 0 ELSE (c + d) % 20 END, \
         CASE WHEN (c * 7919 + d * 104729) % 100 >= 7 THEN 0 ELSE (c + d) % 20 / 3 END, \
         CASE WHEN (c * 7919 + d * 104729) % 100 >= 7 THEN 0 ELSE (c * d) % 5 END \
         FROM ({rows}) AS g"
    );
    let mut statements = vec![table, fill, WRONG_ROWS.to_owned()];
    statements.extend(LEGACY_INDEXES.iter().map(|s| (*s).to_owned()));
    statements.push(match backend {
        Backend::Postgres => "VACUUM ANALYZE campaign_daily_stat_entries".to_owned(),
        Backend::Sqlite => "ANALYZE".to_owned(),
    });
    statements
}

/// The anchor: one set-based statement copying the same non-zero rows into a wide table.
fn one_statement_copy() -> Vec<String> {
    vec![
        "CREATE TABLE anchor_copy (user_id TEXT NOT NULL, campaign_id TEXT NOT NULL, \
         day DATE NOT NULL, sent BIGINT, opened BIGINT, clicked BIGINT, replied BIGINT, \
         positive_replies BIGINT, bounced BIGINT, PRIMARY KEY (user_id, campaign_id, day))"
            .to_owned(),
        "INSERT INTO anchor_copy SELECT user_id, campaign_id, stat_date, sent, opened, 0, \
         replied, positive_replies, bounced FROM campaign_daily_stat_entries \
         WHERE sent > 0 OR opened > 0 OR replied > 0 OR positive_replies > 0 OR bounced > 0 \
         ON CONFLICT DO NOTHING"
            .to_owned(),
    ]
}

/// Peak resident memory of this process (server and client), in bytes.
fn peak_memory() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn run(backend: Backend, url: &str, scale: Scale) -> serde_json::Value {
    let generated = Instant::now();
    execute(backend, url, &legacy_history(backend, scale)).await;
    println!("legacy history generated in {:.1?}", generated.elapsed());
    let anchor = execute(backend, url, &one_statement_copy()).await;
    execute(backend, url, &["DROP TABLE anchor_copy".to_owned()]).await;

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = PoolOptions {
        statement_timeout: Duration::from_secs(600),
        ..PoolOptions::default()
    };
    let shutdown = async {
        let _ = stopped.await;
    };
    let server = match backend {
        Backend::Postgres => {
            let store = PostgresStore::connect(url, &options).await.expect("store");
            spawn_server(listener, store, shutdown)
        }
        Backend::Sqlite => {
            let store = SqliteStore::connect(url, &options).await.expect("store");
            spawn_server(listener, store, shutdown)
        }
    };
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut migration = MigrationServiceClient::new(channel.clone());
    move_to(&mut migration, MigrationPhase::DualWrite).await;

    let memory_before = peak_memory();
    let started = Instant::now();
    let run_id = migration
        .start_backfill(StartBackfillRequest {
            dry_run: false,
            batch_size: 5_000,
            throttle_ms: 0,
            actor: "bench".into(),
        })
        .await
        .expect("StartBackfill")
        .into_inner()
        .run_id;
    let mut progress = migration
        .watch_run(WatchRunRequest { run_id })
        .await
        .expect("WatchRun")
        .into_inner();
    let mut last = None;
    while let Some(update) = progress.next().await {
        last = Some(update.expect("progress"));
    }
    let backfill = started.elapsed();
    let run = last.expect("a run");
    let started = Instant::now();
    let verified = migration
        .verify_consistency(VerifyConsistencyRequest {
            start_date: String::new(),
            end_date: String::new(),
            actor: "bench".into(),
        })
        .await
        .expect("verify")
        .into_inner();
    let verify = started.elapsed();
    let memory_growth = peak_memory().saturating_sub(memory_before);
    move_to(&mut migration, MigrationPhase::Backfilled).await;
    // The rows planted to look wrong are skipped on purpose, as an operator would after
    // reading the report; VERIFIED needs them resolved.
    let resolved = migration
        .resolve_ambiguous_rows(ResolveAmbiguousRowsRequest {
            resolution: AmbiguousResolution::Skip.into(),
            reason: "planted by the seeds benchmark".into(),
            actor: "bench".into(),
            rows: Vec::new(),
            kinds: Vec::new(),
        })
        .await
        .expect("ResolveAmbiguousRows")
        .into_inner();
    assert_eq!(resolved.resolved, run.ambiguous, "{resolved:?}");
    move_to(&mut migration, MigrationPhase::Verified).await;
    let sizes = migration
        .get_storage_report(GetStorageReportRequest {})
        .await
        .expect("storage report")
        .into_inner();

    let reads = compare_reads(channel, scale).await;
    let _ = stop.send(());
    server.await.expect("server task");
    json!({
        "database": match backend { Backend::Postgres => "PostgreSQL", Backend::Sqlite => "SQLite" },
        "date": chrono::Utc::now().date_naive().to_string(),
        "legacy_rows": sizes.legacy_rows,
        "legacy_bytes": sizes.legacy_bytes,
        "new_rows": sizes.new_rows,
        "new_bytes": sizes.new_bytes,
        "backfill": {"state": run.state, "processed": run.processed, "copied": run.copied,
                     "ambiguous": run.ambiguous, "seconds": backfill.as_secs_f64()},
        "one_statement_copy_seconds": anchor.as_secs_f64(),
        "verify": {"seconds": verify.as_secs_f64(), "compared": verified.compared,
                   "mismatches": verified.mismatches},
        "peak_memory_growth_bytes": memory_growth,
        "reads": reads,
    })
}

fn spawn_server<S: Store>(
    listener: TcpListener,
    store: S,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        launch(listener, store, ServerConfig::default(), shutdown)
            .await
            .expect("server");
    })
}

async fn move_to(client: &mut MigrationServiceClient<Channel>, phase: MigrationPhase) {
    client
        .transition_phase(TransitionPhaseRequest {
            force: false,
            target: phase.into(),
            reason: "seeds benchmark".into(),
            actor: "bench".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("to {phase:?}: {e}"));
}

/// p50 and p99 of each read on LEGACY and on NEW, taken in alternating blocks (the users the
/// reads name are overridden to one storage, then the other).
async fn compare_reads(channel: Channel, scale: Scale) -> serde_json::Value {
    let mut rollout = RolloutServiceClient::new(channel.clone());
    let mut stats = StatsServiceClient::new(channel);
    let year_end = (chrono::NaiveDate::from_ymd_opt(2025, 1, 1).expect("date")
        + chrono::Days::new(u64::from(scale.days) - 1))
    .to_string();
    let month_start = (chrono::NaiveDate::from_ymd_opt(2025, 1, 1).expect("date")
        + chrono::Days::new(u64::from(scale.days.saturating_sub(30))))
    .to_string();
    let big_user = "user-0000".to_owned();
    let series = |user: &str, start: &str| GetAggregatedDailyStatsRequest {
        user_id: user.to_owned(),
        start_date: start.to_owned(),
        end_date: year_end.clone(),
        granularity: Granularity::Day.into(),
        campaign_ids: vec![],
        fill_empty: false,
    };
    let reads: Vec<(&str, &str)> = vec![
        ("all users, a year by day", "*"),
        ("all users, 30 days", "*"),
        ("one user, a year by day", ONE_USER),
        ("one campaign, a year", ONE_USER),
        ("100 campaigns of a user", "user-0000"),
    ];
    let mut results = Vec::new();
    for (what, user) in reads {
        let mut samples = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (side, source) in [StorageSource::Legacy, StorageSource::New]
                .into_iter()
                .enumerate()
            {
                rollout
                    .set_user_override(SetUserOverrideRequest {
                        user_id: user.to_owned(),
                        source: source.into(),
                        reason: "seeds benchmark".into(),
                        actor: "bench".into(),
                    })
                    .await
                    .expect("override");
                for _ in 0..BLOCK {
                    let started = Instant::now();
                    let answered = match what {
                        "all users, a year by day" => {
                            stats
                                .get_aggregated_daily_stats(series("", "2025-01-01"))
                                .await
                                .expect("read")
                                .into_inner()
                                .source
                        }
                        "all users, 30 days" => {
                            stats
                                .get_aggregated_daily_stats(series("", &month_start))
                                .await
                                .expect("read")
                                .into_inner()
                                .source
                        }
                        "one user, a year by day" => {
                            stats
                                .get_aggregated_daily_stats(series(user, "2025-01-01"))
                                .await
                                .expect("read")
                                .into_inner()
                                .source
                        }
                        "one campaign, a year" => {
                            stats
                                .get_stats(GetStatsRequest {
                                    user_id: user.to_owned(),
                                    campaign_id: ONE_CAMPAIGN.into(),
                                    start_date: "2025-01-01".into(),
                                    end_date: year_end.clone(),
                                })
                                .await
                                .expect("read")
                                .into_inner()
                                .source
                        }
                        _ => {
                            stats
                                .get_stats_for_campaigns(GetStatsForCampaignsRequest {
                                    user_id: big_user.clone(),
                                    campaign_ids: (0..100)
                                        .map(|c| format!("campaign-{c:05}"))
                                        .collect(),
                                    start_date: "2025-01-01".into(),
                                    end_date: year_end.clone(),
                                })
                                .await
                                .expect("read")
                                .into_inner()
                                .source
                        }
                    };
                    assert_eq!(answered, i32::from(source), "{what} was answered elsewhere");
                    samples[side].push(started.elapsed());
                }
            }
        }
        let [legacy, new] = samples.map(|mut s| {
            s.sort_unstable();
            let at = |q: f64| s[((s.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
            (at(0.5), at(0.99))
        });
        results.push(
            json!({"read": what, "legacy_p50_ms": legacy.0, "legacy_p99_ms": legacy.1,
                            "new_p50_ms": new.0, "new_p99_ms": new.1}),
        );
    }
    serde_json::Value::Array(results)
}

fn print_table(backend: Backend, scale: Scale, figures: &serde_json::Value) {
    let f = |path: &[&str]| {
        path.iter()
            .fold(figures, |v, key| &v[*key])
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    println!(
        "\n{:?}, {} campaigns × {} days ({} legacy rows), {}\n",
        backend,
        scale.campaigns,
        scale.days,
        f(&["legacy_rows"]),
        figures["date"].as_str().unwrap_or_default()
    );
    println!("| | legacy | new | ratio |\n|---|---|---|---|");
    println!(
        "| bytes for the same history | {:.0} MiB | {:.1} MiB | new is {:.1}% of legacy |",
        mib(f(&["legacy_bytes"])),
        mib(f(&["new_bytes"])),
        100.0 * f(&["new_bytes"]) / f(&["legacy_bytes"])
    );
    for read in figures["reads"].as_array().into_iter().flatten() {
        let v = |k: &str| read[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} (p50 / p99 via gRPC) | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.1}× at p50 |",
            read["read"].as_str().unwrap_or_default(),
            v("legacy_p50_ms"),
            v("legacy_p99_ms"),
            v("new_p50_ms"),
            v("new_p99_ms"),
            v("legacy_p50_ms") / v("new_p50_ms")
        );
    }
    println!(
        "| backfill ({} rows, {} copied, {} ambiguous) | — | {:.1} s | {:.1}× one `INSERT … SELECT` of the non-zero rows ({:.2} s) |",
        f(&["backfill", "processed"]),
        f(&["backfill", "copied"]),
        f(&["backfill", "ambiguous"]),
        f(&["backfill", "seconds"]),
        f(&["backfill", "seconds"]) / f(&["one_statement_copy_seconds"]),
        f(&["one_statement_copy_seconds"])
    );
    println!(
        "| verify ({} compared, {} mismatches) | — | {:.1} s | |",
        f(&["verify", "compared"]),
        f(&["verify", "mismatches"]),
        f(&["verify", "seconds"])
    );
    println!(
        "| peak memory growth during backfill + verify (whole process) | — | {:.0} MiB | |",
        mib(f(&["peak_memory_growth_bytes"]))
    );
}
