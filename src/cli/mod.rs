//! The command line: `serve` (the default), `migrate`, the data generator, and the admin
//! commands that talk to a running server.

/// `println!` that hands back the write's error instead of panicking, so that a reader that
/// went away (`campaign-stats … | head`) ends the command quietly: see [`is_broken_pipe`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod admin;
mod generate;
mod rollout;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::app::{GroupCommitSettings, RetentionSettings, ScheduleSettings, ShadowSettings};
use crate::grpc::Limits;
use crate::rollout::{GuardAction, GuardSettings, fraction, ppm};
use crate::server::{AuthSettings, Listeners, ServerConfig, TlsSettings, launch};
use crate::storage::{Backend, DatabaseUrl, PoolOptions, PostgresStore, SqliteStore, Store};
use crate::telemetry::{self, LogFormat};

/// Records campaign events and serves their statistics over gRPC.
#[derive(Debug, Parser)]
#[command(
    name = "campaign-stats",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `serve`, which runs when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (the default).
    Serve(ServeArgs),
    /// Bring the database schema up to date and exit (for a deploy hook).
    Migrate(SchemaArgs),
    /// Migration phase of a running server: status, transition, history.
    Migration {
        #[command(subcommand)]
        command: admin::MigrationCommand,
        #[command(flatten)]
        client: admin::ClientArgs,
    },
    /// The read rollout of a running server: get, set, override, kill-switch, evaluate, …
    Rollout {
        #[command(subcommand)]
        command: rollout::RolloutCommand,
        #[command(flatten)]
        client: admin::ClientArgs,
    },
    /// Copy legacy history into the new storage on a running server, with a progress bar;
    /// `backfill watch|status|cancel [RUN_ID]` come back to a run.
    #[command(args_conflicts_with_subcommands = true)]
    Backfill {
        #[command(subcommand)]
        command: Option<admin::BackfillCommand>,
        #[command(flatten)]
        args: admin::BackfillArgs,
    },
    /// Statistics of a running server: a campaign's totals, a series with a chart, a test
    /// event.
    Stats {
        #[command(subcommand)]
        command: stats::StatsCommand,
    },
    /// Past and running backfills and verifies, newest first, with how each ended.
    Runs {
        /// Most runs shown (the newest).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        client: admin::ClientArgs,
    },
    /// Compare the legacy and new storages on a running server; fails on any difference.
    Verify(admin::VerifyArgs),
    /// Recompute the rollups of a range from what the backfill copied plus the raw events
    /// (a dry run unless --apply), on a running server.
    RepairRollups(admin::RepairArgs),
    /// Rows and bytes of the legacy table against the new storage.
    StorageReport(admin::ClientArgs),
    /// Fill the legacy table of a database with generated history (tests, rehearsals).
    GenerateLegacy(generate::GenerateArgs),
}

/// The defaults of every setting: the flags show these, so that they live in one place
/// (`PoolOptions::DEFAULT`, `ServerConfig::DEFAULT`).
const POOL: PoolOptions = PoolOptions::DEFAULT;
const SERVER: ServerConfig = ServerConfig::DEFAULT;

/// A fraction from 0 to 1.
fn parse_fraction(value: &str) -> Result<f64, String> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("{value:?} is not a fraction from 0 to 1 (e.g. 0.05)"))
}

/// A latency ratio: 0 (off), or from 1 to 1,000.
fn parse_ratio(value: &str) -> Result<f64, String> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|r| *r == 0.0 || (1.0..=1_000.0).contains(r))
        .ok_or_else(|| format!("{value:?} is not 0 (off) or a ratio from 1 to 1000 (e.g. 3)"))
}

/// `duration` in whole milliseconds, as the flags take it.
const fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// Where the database is and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `sqlite://FILE` (created if missing) or `postgres://USER@HOST:PORT/DB`.
    ///
    /// Its value may hold a password: `--help` never shows what the environment sets.
    #[arg(
        long,
        env = "STATS_DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://campaign-stats.db"
    )]
    pub database_url: DatabaseUrl,
    /// Most connections in the database pool.
    #[arg(long, env = "STATS_DB_MAX_CONNECTIONS", default_value_t = POOL.max_connections,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub db_max_connections: u32,
    /// Seconds a call waits for a database connection before failing with UNAVAILABLE.
    #[arg(long, env = "STATS_DB_ACQUIRE_TIMEOUT_SECS",
          default_value_t = POOL.acquire_timeout.as_secs())]
    pub db_acquire_timeout_secs: u64,
    /// Milliseconds one database statement may run (a lock wait included) before its call
    /// fails with UNAVAILABLE and its transaction is rolled back; also bounds a call to a
    /// database that stops answering.
    #[arg(long, env = "STATS_DB_STATEMENT_TIMEOUT_MS",
          default_value_t = millis(POOL.statement_timeout),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub db_statement_timeout_ms: u64,
}

impl DatabaseArgs {
    fn pool_options(&self) -> PoolOptions {
        PoolOptions {
            max_connections: self.db_max_connections,
            acquire_timeout: Duration::from_secs(self.db_acquire_timeout_secs),
            statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// `text` for people, `json` for log collectors. The level comes from RUST_LOG.
    #[arg(long, env = "STATS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC server listens on.
    #[arg(long, env = "STATS_LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    pub listen_addr: SocketAddr,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); none when not given.
    #[arg(long, env = "STATS_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds in-flight calls may take to finish after SIGTERM before they are closed.
    #[arg(long, env = "STATS_SHUTDOWN_GRACE_SECS",
          default_value_t = SERVER.shutdown_grace.as_secs())]
    pub shutdown_grace_secs: u64,
    /// Milliseconds between re-reads of the rollout and phase (changes made through other
    /// replicas arrive within this).
    #[arg(long, env = "STATS_ROLLOUT_REFRESH_MS",
          default_value_t = millis(SERVER.rollout_refresh_interval),
          value_parser = clap::value_parser!(u64).range(10..))]
    pub rollout_refresh_ms: u64,
    /// Milliseconds between database health checks.
    #[arg(long, env = "STATS_HEALTH_CHECK_INTERVAL_MS",
          default_value_t = millis(SERVER.health_check_interval),
          value_parser = clap::value_parser!(u64).range(10..))]
    pub health_check_interval_ms: u64,
    /// A transaction takes queued callers until it holds this many events (a caller's batch
    /// or stream chunk is never split).
    #[arg(long, env = "STATS_GROUP_COMMIT_MAX_EVENTS",
          default_value_t = SERVER.group_commit.max_events as u32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub group_commit_max_events: u32,
    /// Microseconds the first queued write waits for others before its transaction
    /// is written (0: write what has queued at once).
    #[arg(long, env = "STATS_GROUP_COMMIT_WINDOW_US",
          default_value_t = SERVER.group_commit.window.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub group_commit_window_us: u64,
    /// Most events queued at once (single events, batches and stream chunks); past it, a
    /// write answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "STATS_GROUP_COMMIT_QUEUE_EVENTS",
          default_value_t = SERVER.group_commit.queue_events as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub group_commit_queue_events: u32,
    /// Groups of single events written at once, each in its own transaction [default: 4 on
    /// PostgreSQL, which commits them side by side; 2 on SQLite, whose one writer takes them
    /// in turn]
    #[arg(long, env = "STATS_GROUP_COMMIT_FLUSHERS",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub group_commit_flushers: Option<u32>,
    /// Bearer tokens callers must present: one `role name sha256-hex-of-token` line each
    /// (roles: reader, writer, admin); re-read on SIGHUP. Without it anyone may call, which
    /// is allowed only on a loopback address.
    #[arg(long, env = "STATS_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// Serve without tokens on an address other hosts can reach (warned at every start).
    #[arg(long, env = "STATS_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// API calls in flight at once on this replica (a stream counts until it ends); past it,
    /// RESOURCE_EXHAUSTED at once. Health and reflection are not counted.
    #[arg(long, env = "STATS_MAX_CONCURRENT_CALLS",
          default_value_t = SERVER.limits.max_concurrent_calls as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_calls: u32,
    /// Open connections at once; past it a new connection is closed at once.
    #[arg(long, env = "STATS_MAX_CONNECTIONS",
          default_value_t = SERVER.limits.max_connections as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Concurrent calls on one HTTP/2 connection (the client queues the rest).
    #[arg(long, env = "STATS_MAX_STREAMS_PER_CONNECTION",
          default_value_t = SERVER.limits.max_streams_per_connection,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_streams_per_connection: u32,
    /// Milliseconds a unary call may take at most (a shorter client deadline is honoured);
    /// past it, DEADLINE_EXCEEDED and nothing of the call is kept.
    #[arg(long, env = "STATS_MAX_CALL_MS",
          default_value_t = millis(SERVER.limits.max_call_duration),
          value_parser = clap::value_parser!(u64).range(10..))]
    pub max_call_ms: u64,
    /// Milliseconds a StreamEvents stream may stay silent before it is closed
    /// (DEADLINE_EXCEEDED, with the stored count in its trailer).
    #[arg(long, env = "STATS_STREAM_IDLE_TIMEOUT_MS",
          default_value_t = millis(SERVER.limits.stream_idle_timeout),
          value_parser = clap::value_parser!(u64).range(10..))]
    pub stream_idle_timeout_ms: u64,
    /// Seconds between HTTP/2 pings on a connection.
    #[arg(long, env = "STATS_KEEPALIVE_INTERVAL_SECS",
          default_value_t = SERVER.limits.keepalive_interval.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub keepalive_interval_secs: u64,
    /// Seconds a ping may go unanswered before the connection is closed.
    #[arg(long, env = "STATS_KEEPALIVE_TIMEOUT_SECS",
          default_value_t = SERVER.limits.keepalive_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub keepalive_timeout_secs: u64,
    /// Days raw events are kept (by when they occurred) and idempotency keys (by when they
    /// were recorded); rollups are kept forever. Unset: raw events are kept forever.
    #[arg(long, env = "STATS_RAW_RETENTION_DAYS",
          value_parser = clap::value_parser!(u32).range(1..=36_600))]
    pub raw_retention_days: Option<u32>,
    /// Months ahead of the current one whose raw-event partitions are made (PostgreSQL).
    #[arg(long, env = "STATS_PARTITIONS_AHEAD_MONTHS",
          default_value_t = SERVER.retention.partitions_ahead_months,
          value_parser = clap::value_parser!(u32).range(0..=120))]
    pub partitions_ahead_months: u32,
    /// Seconds between retention passes (the first runs at start).
    #[arg(long, env = "STATS_RETENTION_INTERVAL_SECS",
          default_value_t = SERVER.retention.every.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub retention_interval_secs: u64,
    /// The share of reads (0 to 1) also run on the other storage and compared, once both hold
    /// all history (BACKFILLED to NEW_PRIMARY); the caller never waits for it.
    #[arg(long, env = "STATS_SHADOW_SAMPLE_RATE",
          default_value_t = SERVER.shadow.sample_rate, value_parser = parse_fraction)]
    pub shadow_sample_rate: f64,
    /// The guard trips when more than this share (0 to 1) of shadow comparisons in its window
    /// disagree. The rollout's guard settings (`rollout guard set`) win over every `--guard-*`
    /// flag while set.
    #[arg(long, env = "STATS_GUARD_MAX_MISMATCH_RATE",
          default_value_t = fraction(SERVER.guard.max_mismatch_ppm), value_parser = parse_fraction)]
    pub guard_max_mismatch_rate: f64,
    /// The guard trips when more than this share (0 to 1) of new-storage reads fail.
    #[arg(long, env = "STATS_GUARD_MAX_ERROR_RATE",
          default_value_t = fraction(SERVER.guard.max_error_ppm), value_parser = parse_fraction)]
    pub guard_max_error_rate: f64,
    /// The guard trips when the new storage's p99 read time exceeds legacy's by more than
    /// this factor (e.g. 3); 0 turns the signal off.
    #[arg(long, env = "STATS_GUARD_MAX_P99_RATIO", default_value_t = 0.0,
          value_parser = parse_ratio)]
    pub guard_max_p99_ratio: f64,
    /// Samples a signal needs in the window before the guard acts on it.
    #[arg(long, env = "STATS_GUARD_MIN_SAMPLES", default_value_t = SERVER.guard.min_samples,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub guard_min_samples: u32,
    /// The guard's sliding window, in seconds.
    #[arg(long, env = "STATS_GUARD_WINDOW_SECS", default_value_t = SERVER.guard.window_secs,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub guard_window_secs: u32,
    /// What the guard does when it trips: engage the kill switch, or step the percentage back
    /// to the schedule's last green step (0 without a schedule).
    #[arg(long, env = "STATS_GUARD_ACTION", default_value = "kill-switch",
          value_parser = ["kill-switch", "step-back"])]
    pub guard_action: String,
    /// Quarantine (pin to legacy) a user whose own reads disagree this many times in the
    /// window, before anything trips for everyone; 0 turns quarantine off.
    #[arg(long, env = "STATS_GUARD_QUARANTINE_AFTER",
          default_value_t = SERVER.guard.quarantine_after)]
    pub guard_quarantine_after: u32,
    /// Most users quarantined at once; one more trips the guard for everyone.
    #[arg(long, env = "STATS_GUARD_MAX_QUARANTINED",
          default_value_t = SERVER.guard.max_quarantined)]
    pub guard_max_quarantined: u32,
    /// Seconds a replica driving the progressive schedule holds its lease without renewing
    /// it: how soon another replica takes over from one that died.
    #[arg(long, env = "STATS_SCHEDULE_LEASE_SECS",
          default_value_t = SERVER.schedule.lease.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub schedule_lease_secs: u64,
    /// The server's TLS certificate chain (PEM); with `--tls-key`, the API speaks TLS only.
    #[arg(long, env = "STATS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, env = "STATS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Verify clients: only those presenting a certificate this CA (PEM) signed may connect.
    #[arg(long, env = "STATS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

impl ServeArgs {
    /// The server's settings, for a database of `backend`.
    fn server_config(&self, backend: Backend) -> ServerConfig {
        ServerConfig {
            health_check_interval: Duration::from_millis(self.health_check_interval_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            rollout_refresh_interval: Duration::from_millis(self.rollout_refresh_ms),
            group_commit: GroupCommitSettings {
                max_events: self.group_commit_max_events as usize,
                window: Duration::from_micros(self.group_commit_window_us),
                queue_events: self.group_commit_queue_events as usize,
                flushers: self
                    .group_commit_flushers
                    .map_or(GroupCommitSettings::flushers_for(backend), |n| n as usize),
            },
            auth: self
                .auth_tokens_file
                .clone()
                .map(|tokens_file| AuthSettings { tokens_file }),
            insecure_no_auth: self.insecure_no_auth,
            limits: Limits {
                max_concurrent_calls: self.max_concurrent_calls as usize,
                max_connections: self.max_connections as usize,
                max_streams_per_connection: self.max_streams_per_connection,
                max_call_duration: Duration::from_millis(self.max_call_ms),
                stream_idle_timeout: Duration::from_millis(self.stream_idle_timeout_ms),
                keepalive_interval: Duration::from_secs(self.keepalive_interval_secs),
                keepalive_timeout: Duration::from_secs(self.keepalive_timeout_secs),
            },
            retention: RetentionSettings {
                raw_retention: self
                    .raw_retention_days
                    .map(|days| Duration::from_secs(u64::from(days) * 86_400)),
                partitions_ahead_months: self.partitions_ahead_months,
                every: Duration::from_secs(self.retention_interval_secs),
                ..RetentionSettings::DEFAULT
            },
            shadow: ShadowSettings {
                sample_rate: self.shadow_sample_rate,
                ..ShadowSettings::DEFAULT
            },
            guard: GuardSettings {
                max_mismatch_ppm: ppm(self.guard_max_mismatch_rate),
                max_error_ppm: ppm(self.guard_max_error_rate),
                max_p99_ratio_percent: (self.guard_max_p99_ratio * 100.0).round() as u32,
                min_samples: self.guard_min_samples,
                window_secs: self.guard_window_secs,
                action: GuardAction::from_name(&self.guard_action).unwrap_or_default(),
                quarantine_after: self.guard_quarantine_after,
                max_quarantined: self.guard_max_quarantined,
            },
            schedule: ScheduleSettings {
                lease: Duration::from_secs(self.schedule_lease_secs),
                ..ScheduleSettings::DEFAULT
            },
            tls: self
                .tls_cert
                .clone()
                .zip(self.tls_key.clone())
                .map(|(cert, key)| TlsSettings {
                    cert,
                    key,
                    client_ca: self.tls_client_ca.clone(),
                }),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SchemaArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Whether `error` comes from writing to a stdout whose reader has gone (a closed pipe): the
/// command then stops quietly with success, as `ls | head` and `rg | head` do.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `text` with every control character escaped (`\n`, `\u{1b}`), for printing text that came
/// from the server (a reason, an actor, an error): stored text must not fake rows or move the
/// cursor on an operator's terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// Runs the command the user asked for.
impl Cli {
    /// How the command prints results, and so errors (`-o json`: JSON on stderr).
    pub fn output(&self) -> admin::Output {
        match &self.command {
            Some(Command::Migration { client, .. } | Command::Rollout { client, .. }) => {
                client.output
            }
            Some(Command::Backfill {
                command: Some(command),
                ..
            }) => command.client().output,
            Some(Command::Backfill { args, .. }) => args.client.output,
            Some(Command::Runs { client, .. }) => client.output,
            Some(Command::Stats { command }) => command.client().output,
            Some(Command::Verify(args)) => args.client.output,
            Some(Command::RepairRollups(args)) => args.client.output,
            Some(Command::StorageReport(client)) => client.output,
            _ => admin::Output::Text,
        }
    }
}

/// Says once, on stderr, why `campaign-stats` failed: through the log where the command logs
/// (serve, migrate), else as one line, or as JSON under `-o json`.
pub fn report_failure(error: &anyhow::Error, output: admin::Output) {
    let message = one_line(error);
    if tracing::dispatcher::has_been_set() {
        tracing::error!(error = message, "campaign-stats failed");
        return;
    }
    match (output, error.downcast_ref::<admin::Refused>()) {
        (admin::Output::Json, Some(refused)) => eprintln!("{}", refused.to_json()),
        (admin::Output::Json, None) => eprintln!(
            "{}",
            serde_json::json!({"error": {"code": null, "message": message}})
        ),
        (admin::Output::Text, _) => eprintln!("campaign-stats: {message}"),
    }
}

/// `error` and its causes on one line, each cause said once: a library that repeats its
/// source in its own message (`database "x" does not exist: database "x" does not exist`)
/// is not echoed.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve(cli.serve)) {
        Command::Serve(args) => serve(args).await,
        Command::Migrate(args) => update_schema(args).await,
        Command::Migration { command, client } => admin::migration(command, client).await,
        Command::Rollout { command, client } => rollout::rollout(command, client).await,
        Command::Backfill {
            command: Some(command),
            ..
        } => admin::backfill_again(command).await,
        Command::Backfill { args, .. } => admin::backfill(args).await,
        Command::Runs { limit, client } => admin::runs(limit, client).await,
        Command::Stats { command } => stats::stats(command).await,
        Command::Verify(args) => admin::verify(args).await,
        Command::RepairRollups(args) => admin::repair_rollups(args).await,
        Command::StorageReport(args) => admin::storage_report(args).await,
        Command::GenerateLegacy(args) => generate::generate(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    telemetry::init(args.log.log_format);
    let listeners = Listeners {
        grpc: bind(args.listen_addr).await?,
        metrics: match args.metrics_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        },
    };
    let url = args.database.database_url.expose();
    let backend = Backend::from_url(url)?;
    let config = args.server_config(backend);
    let options = args.database.pool_options();
    tracing::info!(database = %telemetry::redact_url(url), "connecting to the database");
    // The one place a backend is chosen; everything below is generic over `Store`.
    match backend {
        Backend::Sqlite => {
            let store = SqliteStore::connect(url, &options).await?;
            launch(listeners, store, config, shutdown_signal()).await?
        }
        Backend::Postgres => {
            let store = PostgresStore::connect(url, &options).await?;
            launch(listeners, store, config, shutdown_signal()).await?
        }
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not listen on {addr}"))
}

async fn update_schema(args: SchemaArgs) -> anyhow::Result<()> {
    telemetry::init(args.log.log_format);
    let url = args.database.database_url.expose();
    let options = args.database.pool_options();
    match Backend::from_url(url)? {
        Backend::Sqlite => update_store_schema(SqliteStore::connect(url, &options).await?).await?,
        Backend::Postgres => {
            update_store_schema(PostgresStore::connect(url, &options).await?).await?
        }
    }
    tracing::info!(database = %telemetry::redact_url(url), "schema is up to date");
    Ok(())
}

async fn update_store_schema<S: Store>(store: S) -> anyhow::Result<()> {
    let updated = store.update_schema().await;
    store.close().await;
    Ok(updated?)
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested: finishing in-flight calls");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_says_each_cause_once() {
        let inner = anyhow::anyhow!("database \"x\" does not exist");
        let repeated = inner
            .context("database \"x\" does not exist")
            .context("cannot start");
        assert_eq!(
            one_line(&repeated),
            "cannot start: database \"x\" does not exist"
        );
    }

    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(printable("plain ✓"), "plain ✓");
        assert_eq!(printable("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
    }

    #[test]
    fn a_closed_pipe_is_told_apart() {
        let closed = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(is_broken_pipe(
            &anyhow::Error::from(closed).context("printing")
        ));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
