//! The test harness: a fresh database per test (a SQLite file, or a PostgreSQL database made
//! for it), the real server on a free port, and real tonic clients.

#![allow(dead_code)]

pub mod api;
pub mod metrics;
pub mod process;
pub mod proxy;

pub use metrics::Scrape;
pub use process::ServerProcess;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use campaign_stats::domain::StorageSource;
use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{self, Event, EventType};
use campaign_stats::migration::Phase;
use campaign_stats::server::{LaunchError, Listeners, ServerConfig, launch};
use campaign_stats::storage::{PoolOptions, PostgresStore, SqliteStore, Store};
use sqlx::Connection;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The PostgreSQL server the PostgreSQL half runs against (a URL to an existing database on
/// it, e.g. `postgres://postgres@127.0.0.1:5432/postgres`); each test makes its own database.
pub const POSTGRES_URL_ENV: &str = "STATS_TEST_POSTGRES_URL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates `sqlite::NAME` and `postgres::NAME` tests from `async fn NAME(db: TestDb)`, so
/// that one test body proves the behaviour on both backends.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = $crate::common::TestDb::create($crate::common::Backend::Sqlite).await {
                        super::$name(db).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[cfg_attr(not(postgres_tests), ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = $crate::common::TestDb::create($crate::common::Backend::Postgres).await {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}

/// The PostgreSQL URL to test against; `None` (with a notice) when none is configured.
/// In CI (`CI` set) a missing URL fails the test instead: CI must run both halves.
pub fn postgres_url() -> Option<String> {
    match std::env::var(POSTGRES_URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "{POSTGRES_URL_ENV} is not set, and CI must run the PostgreSQL half of the tests"
            )
        }
        _ => {
            static NOTICE: Once = Once::new();
            NOTICE.call_once(|| {
                // Written straight to stderr so that the test harness does not capture it.
                let _ = writeln!(
                    std::io::stderr(),
                    "\nNOTE: the tests were built with {POSTGRES_URL_ENV} but run without it: \
                     the PostgreSQL half passes without running. Set it when running too.\n"
                );
            });
            None
        }
    }
}

/// Generates, from `async fn NAME(db: TestDb)`, a test per backend and per read path:
/// `{sqlite,postgres}::legacy::NAME` runs with the database in LEGACY_ONLY (writes and reads
/// on the legacy table) and `{sqlite,postgres}::new::NAME` in NEW_PRIMARY (writes to both,
/// reads from the new storage), so that one body proves both storages answer alike.
#[macro_export]
macro_rules! on_both_backends_and_storages {
    ($($name:ident),* $(,)?) => {
        mod legacy {
            use campaign_stats::migration::Phase;
            $crate::in_phase!(Phase::LegacyOnly; $($name),*);
        }
        mod new {
            use campaign_stats::migration::Phase;
            $crate::in_phase!(Phase::NewPrimary; $($name),*);
        }
    };
}

#[macro_export]
#[doc(hidden)]
macro_rules! in_phase {
    ($phase:expr; $($name:ident),*) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = $crate::common::TestDb::create($crate::common::Backend::Sqlite).await {
                        super::super::$name(db.in_phase($phase)).await;
                    }
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[cfg_attr(not(postgres_tests), ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = $crate::common::TestDb::create($crate::common::Backend::Postgres).await {
                        super::super::$name(db.in_phase($phase)).await;
                    }
                }
            )*
        }
    };
}

/// A database of its own for one test, removed when dropped.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    /// The migration phase the database is put in before the first server starts.
    pub phase: Phase,
    _dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the server URL to drop the database through, and its name.
    postgres: Option<(String, String)>,
}

impl TestDb {
    /// A fresh, empty database; `None` when the backend is not available here.
    pub async fn create(backend: Backend) -> Option<Self> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}", dir.path().join("stats.db").display());
                Some(Self {
                    backend,
                    url,
                    phase: Phase::LegacyOnly,
                    _dir: Some(dir),
                    postgres: None,
                })
            }
            Backend::Postgres => {
                let server_url = postgres_url()?;
                static COUNTER: AtomicU32 = AtomicU32::new(0);
                let name = format!(
                    "cs_test_{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed)
                );
                let mut admin = sqlx::PgConnection::connect(&server_url)
                    .await
                    .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {server_url}: {e}"));
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await
                .expect("drop a stale test database");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .expect("create the test database");
                let _ = admin.close().await;
                let mut url = url::Url::parse(&server_url).expect("PostgreSQL URL");
                url.set_path(&name);
                Some(Self {
                    backend,
                    url: url.to_string(),
                    phase: Phase::LegacyOnly,
                    _dir: None,
                    postgres: Some((server_url, name)),
                })
            }
        }
    }

    /// The same database, put in `phase` when a server first starts on it (set directly in
    /// the database: a fixture for "a deployment in that phase", not a transition).
    pub fn in_phase(mut self, phase: Phase) -> Self {
        self.phase = phase;
        self
    }

    /// The storage reads come from in this database's phase, under the rollout a new
    /// database starts with (0 %, kill switch off).
    pub fn read_source(&self) -> StorageSource {
        let fresh = campaign_stats::rollout::RolloutConfig {
            basis_points: 0,
            kill_switch: false,
            salt: String::new(),
            version: 0,
            shadow_sample_ppm: None,
            automation: Default::default(),
        };
        campaign_stats::rollout::baseline(self.phase, &fresh)
    }

    /// This database's phase as the CLI prints it (`LEGACY_ONLY`).
    pub fn expected_phase_name(&self) -> &'static str {
        self.phase.name()
    }

    /// The `source` a read response carries in this database's phase.
    pub fn expected_source(&self) -> i32 {
        match self.read_source() {
            StorageSource::Legacy => proto::StorageSource::Legacy.into(),
            StorageSource::New => proto::StorageSource::New.into(),
        }
    }

    /// Starts a server on this database without touching its phase (a restart).
    pub async fn start_server_keeping_phase(&self) -> TestServer {
        let options = PoolOptions::default();
        self.start(&self.url, &options, TestServer::config(), false)
            .await
    }

    /// Starts a server on this database.
    pub async fn start_server(&self) -> TestServer {
        self.start_server_at(&self.url).await
    }

    /// Starts a server reaching this database through `url` (e.g. through a proxy).
    pub async fn start_server_at(&self, url: &str) -> TestServer {
        let options = PoolOptions {
            max_connections: 8,
            acquire_timeout: std::time::Duration::from_secs(2),
            ..PoolOptions::default()
        };
        self.start_server_with(url, &options).await
    }

    /// Starts a server reaching this database through `url` with the pool `options`.
    pub async fn start_server_with(&self, url: &str, options: &PoolOptions) -> TestServer {
        self.start_server_configured(url, options, TestServer::config())
            .await
    }

    /// Starts a server reaching this database through `url` with the pool `options` and the
    /// server settings `config`.
    pub async fn start_server_configured(
        &self,
        url: &str,
        options: &PoolOptions,
        config: ServerConfig,
    ) -> TestServer {
        self.start(url, options, config, true).await
    }

    /// Starts a server through `url`; `prepare` first brings the schema up to date and puts
    /// the database in [`TestDb::phase`].
    async fn start(
        &self,
        url: &str,
        options: &PoolOptions,
        config: ServerConfig,
        prepare: bool,
    ) -> TestServer {
        match self.backend {
            Backend::Sqlite => {
                let store = SqliteStore::connect(url, options)
                    .await
                    .expect("open SQLite");
                self.serve(store, config, prepare).await
            }
            Backend::Postgres => {
                let store = PostgresStore::connect(url, options)
                    .await
                    .expect("connect to PostgreSQL");
                self.serve(store, config, prepare).await
            }
        }
    }

    async fn serve<S: Store>(&self, store: S, config: ServerConfig, prepare: bool) -> TestServer {
        if prepare {
            self.prepare(&store).await;
        }
        TestServer::start_with(store, config).await
    }

    /// Another writer holding what the next write to campaign `c1` needs, until dropped: the
    /// legacy row on PostgreSQL (it must exist), the database's write lock on SQLite.
    pub async fn hold_writes_to_c1(&self) -> Box<dyn std::any::Any + Send> {
        match self.backend {
            Backend::Postgres => {
                let mut writer = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect");
                sqlx::raw_sql(
                    "BEGIN; SELECT * FROM campaign_daily_stat_entries WHERE campaign_id = 'c1' \
                     FOR UPDATE",
                )
                .execute(&mut writer)
                .await
                .expect("lock the row");
                Box::new(writer)
            }
            Backend::Sqlite => {
                let mut writer = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("open");
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut writer)
                    .await
                    .expect("take the write lock");
                Box::new(writer)
            }
        }
    }

    /// Migrates the schema and puts the database in [`TestDb::phase`].
    async fn prepare<S: Store>(&self, store: &S) {
        store.update_schema().await.expect("migrate");
        let sql = format!(
            "UPDATE migration_state SET phase = '{}' WHERE id = 1",
            self.phase.name()
        );
        self.execute(&sql).await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((server_url, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread with
        // a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&server_url)
                    .await
                    .map_err(std::io::Error::other)?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await
                .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(())
            })
        })
        .join();
    }
}

/// A running server and the means to stop it.
pub struct TestServer {
    pub addr: SocketAddr,
    /// Where its Prometheus metrics are served.
    pub metrics_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), LaunchError>>,
}

impl TestServer {
    /// Serves `store` on a free port. The listener is bound before this returns, so clients
    /// may connect at once: their calls wait until the server is ready.
    pub async fn start<S: Store>(store: S) -> Self {
        Self::start_with(store, Self::config()).await
    }

    /// The settings test servers run with: quick health checks and rollout refreshes.
    pub fn config() -> ServerConfig {
        ServerConfig {
            health_check_interval: std::time::Duration::from_millis(200),
            shutdown_grace: std::time::Duration::from_secs(5),
            rollout_refresh_interval: std::time::Duration::from_millis(100),
            ..ServerConfig::default()
        }
    }

    /// Serves `store` with `config` on a free port.
    pub async fn start_with<S: Store>(store: S, config: ServerConfig) -> Self {
        let bind = || async {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a free port");
            let addr = listener.local_addr().expect("bound address");
            (listener, addr)
        };
        let ((grpc, addr), (metrics, metrics_addr)) = (bind().await, bind().await);
        let listeners = Listeners {
            grpc,
            metrics: Some(metrics),
        };
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(launch(listeners, store, config, async {
            let _ = stop.await;
        }));
        Self {
            addr,
            metrics_addr,
            shutdown: Some(shutdown),
            task,
        }
    }

    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    /// Its metrics, as Prometheus scrapes them.
    pub async fn metrics(&self) -> Scrape {
        Scrape::scrape(self.metrics_addr).await
    }

    pub async fn stats(&self) -> StatsServiceClient<Channel> {
        StatsServiceClient::new(self.channel().await)
    }

    /// Shuts the server down gracefully and waits until it has stopped.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        (&mut self.task)
            .await
            .expect("server task")
            .expect("server stopped cleanly");
    }
}

/// A plaintext gRPC channel to a server listening on `addr`.
pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the server at {addr}: {e}"))
}

/// A valid event of `user` on `campaign`, happening on `day` (`YYYY-MM-DD`) at noon UTC.
pub fn event(user: &str, campaign: &str, event_type: EventType, count: u32, day: &str) -> Event {
    Event {
        user_id: user.into(),
        campaign_id: campaign.into(),
        event_type: event_type.into(),
        count,
        occurred_at: Some(noon(day)),
        email_account_id: String::new(),
        idempotency_key: String::new(),
    }
}

/// Noon UTC of `day` (`YYYY-MM-DD`) as a protobuf timestamp.
pub fn noon(day: &str) -> prost_types::Timestamp {
    let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").expect("test date");
    let at = date.and_hms_opt(12, 0, 0).expect("noon").and_utc();
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    }
}

/// `GetStats` for one campaign over a range; panics on error.
pub async fn campaign_metrics(
    client: &mut StatsServiceClient<Channel>,
    user: &str,
    campaign: &str,
    start: &str,
    end: &str,
) -> proto::Metrics {
    client
        .get_stats(proto::GetStatsRequest {
            user_id: user.into(),
            campaign_id: campaign.into(),
            start_date: start.into(),
            end_date: end.into(),
        })
        .await
        .expect("GetStats")
        .into_inner()
        .metrics
        .unwrap_or_default()
}

/// Asserts that `status` has `code` and names each of `fields` (in its message and in its
/// `BadRequest` detail).
pub fn assert_names_fields(status: &tonic::Status, code: tonic::Code, fields: &[&str]) {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let violations = status
        .get_details_bad_request()
        .map(|details| details.field_violations)
        .unwrap_or_default();
    let named: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    for field in fields {
        assert!(
            status.message().contains(field),
            "message {:?} does not name {field}",
            status.message()
        );
        assert!(
            named.contains(field),
            "details {named:?} do not name {field}"
        );
    }
}

impl TestDb {
    /// Runs `sql` (a statement without parameters) straight on the database, as an operator
    /// or the legacy system would.
    pub async fn execute(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self.backend {
            Backend::Sqlite => {
                // Created if missing: a test may write as the legacy system before any server.
                let options =
                    <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&self.url)
                        .expect("SQLite URL")
                        .create_if_missing(true);
                let mut connection = sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .expect("open");
                sqlx::raw_sql(sql)
                    .execute(&mut connection)
                    .await
                    .expect("execute");
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect");
                sqlx::raw_sql(sql)
                    .execute(&mut connection)
                    .await
                    .expect("execute");
            }
        }
    }

    /// The one integer `sql` selects.
    pub async fn scalar(&self, sql: &str) -> i64 {
        // PostgreSQL types sums and counts variously (numeric, int4, int8): read them as int8.
        let sql = sqlx::AssertSqlSafe(match self.backend {
            Backend::Sqlite => sql.to_owned(),
            Backend::Postgres => format!("SELECT ({sql})::int8"),
        });
        match self.backend {
            Backend::Sqlite => {
                let mut connection = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("open");
                sqlx::query_scalar(sql)
                    .fetch_one(&mut connection)
                    .await
                    .expect("query")
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect");
                sqlx::query_scalar(sql)
                    .fetch_one(&mut connection)
                    .await
                    .expect("query")
            }
        }
    }
}
