//! Wires the services, health, reflection and the tower layer stack into one server.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower_http::classify::{GrpcCode, GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::TraceLayer;

use crate::app::{
    GroupCommit, GroupCommitSettings, Guard, Jobs, RetentionSettings, RolloutView, ScheduleDriver,
    ScheduleSettings, Shadow, ShadowSettings, keep_raw_events_trimmed,
};
use crate::app::{Migration, RolloutControl, Stats};
use crate::domain::Tokens;
use crate::grpc::proto::migration_service_server::MigrationServiceServer;
use crate::grpc::proto::rollout_service_server::RolloutServiceServer;
use crate::grpc::proto::stats_service_server::StatsServiceServer;
use crate::grpc::{
    self, AuthLayer, Authenticator, CallLimitsLayer, Limits, MigrationApi, RolloutApi, StatsApi,
    limit_connections,
};
use crate::health;
use crate::migration::Phase;
use crate::rollout::GuardSettings;
use crate::storage::{Bounded, Database, StorageError, Store};
use crate::telemetry::{ReplicaSample, RpcMetricsLayer, ServerMetrics, serve_metrics};

/// Settings of a running server that are not about the database.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How often the database is pinged for the health service.
    pub health_check_interval: Duration,
    /// After shutdown is requested, how long in-flight calls may take to finish before the
    /// server closes them (long-lived streams such as health watches never finish by
    /// themselves).
    pub shutdown_grace: Duration,
    /// How often each replica re-reads the rollout and the phase from the database.
    pub rollout_refresh_interval: Duration,
    /// How concurrent single-event writes are grouped into transactions.
    pub group_commit: GroupCommitSettings,
    /// Who may call; `None`: anyone (then only on a loopback address, unless
    /// [`ServerConfig::insecure_no_auth`]).
    pub auth: Option<AuthSettings>,
    /// Serve without tokens on an address other hosts can reach (a warning at every start).
    pub insecure_no_auth: bool,
    /// TLS for the gRPC API; `None`: plaintext.
    pub tls: Option<TlsSettings>,
    /// What callers get at most.
    pub limits: Limits,
    /// How long raw events are kept, and partitions made ahead.
    pub retention: RetentionSettings,
    /// Which reads are run again on the other storage and compared.
    pub shadow: ShadowSettings,
    /// The guard's thresholds until the rollout sets others at run time.
    pub guard: GuardSettings,
    /// How the progressive schedule is driven.
    pub schedule: ScheduleSettings,
}

/// The server's certificate and key, and the CA that client certificates must be signed by
/// when clients are verified. Files in PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When given, only clients presenting a certificate this CA signed may connect.
    pub client_ca: Option<PathBuf>,
}

impl TlsSettings {
    /// tonic's TLS configuration from the files.
    fn load(&self) -> Result<ServerTlsConfig, LaunchError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| LaunchError::TlsFile {
                path: path.clone(),
                source,
            })
        };
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(config)
    }
}

/// Where the accepted tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// One `role name sha256-hex-of-token` line per token; read at start and on SIGHUP.
    pub tokens_file: PathBuf,
}

impl ServerConfig {
    /// The defaults, in one place: the command line shows and uses these.
    pub const DEFAULT: Self = Self {
        health_check_interval: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(20),
        rollout_refresh_interval: Duration::from_millis(500),
        group_commit: GroupCommitSettings::DEFAULT,
        auth: None,
        insecure_no_auth: false,
        tls: None,
        limits: Limits::DEFAULT,
        retention: RetentionSettings::DEFAULT,
        shadow: ShadowSettings::DEFAULT,
        guard: GuardSettings::DEFAULT,
        schedule: ScheduleSettings::DEFAULT,
    };
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The sockets a server answers on.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC API.
    pub grpc: TcpListener,
    /// Prometheus metrics (`GET /metrics`), when wanted.
    pub metrics: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    /// gRPC only, no metrics endpoint.
    fn from(grpc: TcpListener) -> Self {
        Self {
            grpc,
            metrics: None,
        }
    }
}

/// HTTP/2 flow control, sized for producers that stream many small events at once on one
/// connection (grpcio sends each message in a DATA frame of its own).
///
/// h2 charges every buffered DATA frame under 256 bytes `256 - payload` bytes against a
/// per-connection budget of half the connection window, and closes the connection (GOAWAY
/// ENHANCE_YOUR_CALM "too_many_data_frames") when the budget runs out. Unread data per stream
/// is bounded by the stream window, so in the worst case `streams × stream window` bytes of
/// frames of `L` bytes wait unread, charging `(256 - L) / L` per byte. With hyper's defaults
/// (1 MiB for both windows) 64 streams of ~60-byte events fill the connection window before
/// their handlers run and trip the budget 6 times over. Here: 128 streams × 64 KiB = 8 MiB of
/// unread data at most, which for events of 30 bytes and more charges at most 60 MiB, under
/// the 64 MiB budget a 128 MiB connection window gives (with the default
/// [`Limits::max_streams_per_connection`]). The budget still caps what a client
/// sending tinier frames can make a connection hold.
const HTTP2_STREAM_WINDOW: u32 = 64 * 1024;
/// See [`HTTP2_STREAM_WINDOW`].
const HTTP2_CONNECTION_WINDOW: u32 = 128 * 1024 * 1024;

/// The encoded descriptors of everything served: reflection describes them, and the metrics
/// label calls by the methods they define.
const DESCRIPTOR_SETS: [&[u8]; 5] = [
    grpc::proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_types::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// Every API service with the same limits: requests up to [`grpc::MAX_MESSAGE_BYTES`].
/// (Each generated server type has its own setter, so no shared trait can do it.)
macro_rules! with_limits {
    ($service:expr) => {
        $service.max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
    };
}

/// Why a server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("could not prepare the database")]
    Storage(#[from] StorageError),
    #[error("could not build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
    #[error("the metrics endpoint failed")]
    Metrics(#[source] std::io::Error),
    #[error("cannot read the tokens file {path}")]
    TokensFile {
        path: PathBuf,
        #[source]
        source: TokensError,
    },
    #[error(
        "refusing to serve {0} without tokens: any host that reaches it could move the \
         migration and the rollout. Give --auth-tokens-file, listen on a loopback address, \
         or pass --insecure-no-auth"
    )]
    OpenToTheNetwork(SocketAddr),
    #[error("could not read the gRPC listener's address")]
    Listener(#[source] std::io::Error),
    #[error("cannot read the TLS file {path}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a tokens file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error(transparent)]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Parse(#[from] crate::domain::TokensFileError),
    #[error("it lists no token")]
    Empty,
}

/// Reads the tokens of `settings`: refused when unreadable, malformed or empty (an empty
/// file would lock everyone out, most likely by mistake).
fn read_tokens(settings: &AuthSettings) -> Result<Tokens, LaunchError> {
    let read = || -> Result<Tokens, TokensError> {
        let tokens = Tokens::parse(&std::fs::read_to_string(&settings.tokens_file)?)?;
        if tokens.is_empty() {
            return Err(TokensError::Empty);
        }
        Ok(tokens)
    };
    read().map_err(|source| LaunchError::TokensFile {
        path: settings.tokens_file.clone(),
        source,
    })
}

/// Who may call a server on `addr` configured with `config`: the tokens when there are any;
/// else anyone, which is refused on an address other hosts reach unless the operator insists.
fn authenticator(
    config: &ServerConfig,
    addr: SocketAddr,
) -> Result<Option<Authenticator>, LaunchError> {
    match &config.auth {
        Some(settings) => {
            let tokens = read_tokens(settings)?;
            tracing::info!(tokens = tokens.len(), file = %settings.tokens_file.display(), "calls need a bearer token");
            Ok(Some(Authenticator::new(tokens)))
        }
        None if addr.ip().is_loopback() => Ok(None),
        None if config.insecure_no_auth => {
            tracing::warn!(%addr, "serving without authentication on an address other hosts can reach (--insecure-no-auth)");
            Ok(None)
        }
        None => Err(LaunchError::OpenToTheNetwork(addr)),
    }
}

/// Re-reads the tokens file on every SIGHUP until `stop`; a file that cannot be used leaves
/// the tokens as they were, and says why.
async fn reload_tokens_on_hangup(
    settings: AuthSettings,
    authenticator: Authenticator,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP: the tokens file is read only at start");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                match read_tokens(&settings) {
                    Ok(tokens) => {
                        tracing::info!(tokens = tokens.len(), "tokens file reloaded");
                        authenticator.replace(tokens);
                    }
                    Err(error) => tracing::error!(error = %crate::telemetry::error_chain(&error), "tokens file not reloaded; the previous tokens stay"),
                }
            }
        }
    }
}

/// Brings `store`'s schema up to date, then serves every service on `listeners` until `shutdown` completes;
/// in-flight calls are finished before it returns, and the database pools are closed.
pub async fn launch<S: Store>(
    listeners: impl Into<Listeners>,
    store: S,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), LaunchError> {
    Application::build(listeners, store, config)
        .await?
        .run_until_stopped(shutdown)
        .await
}

/// A server ready to answer: its schema up to date, its rollout loaded, its tasks started
/// and its services built, on a bound listener (so that tests can use port 0).
pub struct Application<S: Store> {
    grpc: TcpListener,
    routes: Routes,
    authenticator: Option<Authenticator>,
    tls: Option<ServerTlsConfig>,
    running: Running<S>,
    config: ServerConfig,
}

/// What a running server stops, in order, at shutdown.
struct Running<S: Store> {
    store: Arc<Bounded<S>>,
    jobs: Jobs,
    group_commit: GroupCommit,
    health: HealthReporter,
    metrics: Arc<ServerMetrics>,
    metrics_endpoint: Option<MetricsEndpoint>,
}

impl<S: Store> Application<S> {
    /// Updates `store`'s schema, loads the rollout, starts the background tasks (rollout refresh,
    /// health checks, the write queue, the metrics endpoint) and builds the services.
    pub async fn build(
        listeners: impl Into<Listeners>,
        store: S,
        config: ServerConfig,
    ) -> Result<Self, LaunchError> {
        let Listeners { grpc, metrics } = listeners.into();
        let authenticator =
            authenticator(&config, grpc.local_addr().map_err(LaunchError::Listener)?)?;
        let tls = config.tls.as_ref().map(TlsSettings::load).transpose()?;
        store.update_schema().await?;
        // From here on every storage call is bounded by the statement timeout.
        let store = Arc::new(Bounded::new(store));
        let view = RolloutView::load(store.as_ref()).await?;
        let server_metrics = Arc::new(ServerMetrics::new(&DESCRIPTOR_SETS));
        server_metrics.expect_guard_signals(crate::rollout::Signal::ALL.map(|s| s.name()));
        let metrics_endpoint = metrics.map(|listener| {
            MetricsEndpoint::start(listener, Arc::clone(&server_metrics), view.clone(), &store)
        });
        let jobs = Jobs::default();
        if let (Some(settings), Some(authenticator)) = (config.auth.clone(), authenticator.clone())
        {
            jobs.spawn(move |stop| reload_tokens_on_hangup(settings, authenticator, stop));
        }
        {
            let (view, store) = (view.clone(), Arc::clone(&store));
            let every = config.rollout_refresh_interval;
            jobs.spawn(move |stop| view.keep_fresh(store, every, stop));
        }
        {
            let (store, settings) = (Arc::clone(&store), config.retention);
            jobs.spawn(move |stop| keep_raw_events_trimmed(store, settings, stop));
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(health::LIVENESS, ServingStatus::Serving)
            .await;
        health::check_once(store.as_ref(), &health, config.health_check_interval).await;
        {
            let (store, health) = (Arc::clone(&store), health.clone());
            let every = config.health_check_interval;
            jobs.spawn_serving(move |stop| health::watch_database(store, health, every, stop));
        }
        let group_commit = GroupCommit::start(
            Arc::clone(&store),
            config.group_commit,
            &jobs,
            Arc::clone(&server_metrics),
        );
        let guard = Guard::start(
            Arc::clone(&store),
            view.clone(),
            config.guard,
            &jobs,
            Arc::clone(&server_metrics),
        );
        ScheduleDriver::start(
            Arc::clone(&store),
            view.clone(),
            guard.clone(),
            config.schedule,
            &jobs,
            Arc::clone(&server_metrics),
        );
        let shadow = Shadow::start(
            Arc::clone(&store),
            view.clone(),
            config.shadow,
            &jobs,
            Arc::clone(&server_metrics),
            guard.clone(),
        );
        let mut routes = Routes::builder();
        routes
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(with_limits!(StatsServiceServer::new(StatsApi::new(
                Stats::new(
                    Arc::clone(&store),
                    view.clone(),
                    Arc::clone(&server_metrics),
                    group_commit.clone(),
                )
                .with_shadow(shadow.clone())
                .with_guard(guard.clone()),
                config.limits.stream_idle_timeout,
            ))))
            .add_service(with_limits!(RolloutServiceServer::new(RolloutApi::new(
                RolloutControl::new(Arc::clone(&store), view.clone(), jobs.clone())
                    .with_shadow(shadow)
                    .with_guard(guard)
            ))))
            .add_service(with_limits!(MigrationServiceServer::new(
                MigrationApi::new(
                    Migration::new(Arc::clone(&store), jobs.clone(), view)
                        .with_retention(config.retention)
                )
            )));
        Ok(Self {
            grpc,
            routes: routes.routes(),
            authenticator,
            tls,
            running: Running {
                store,
                jobs,
                group_commit,
                health,
                metrics: server_metrics,
                metrics_endpoint,
            },
            config,
        })
    }

    /// Where the gRPC API answers.
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// Serves until `shutdown` completes, then stops: see [`Running::begin_shutdown`] and
    /// [`Running::finish`]. Calls still open [`ServerConfig::shutdown_grace`] after shutdown
    /// began are closed.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), LaunchError> {
        let Self {
            grpc,
            routes,
            authenticator,
            tls,
            running,
            config,
        } = self;
        if let Ok(addr) = grpc.local_addr() {
            tracing::info!(%addr, tls = tls.is_some(), "serving gRPC");
        }
        let grace = config.shutdown_grace;
        let began = tokio::sync::Notify::new();
        let shutdown = async {
            shutdown.await;
            running.begin_shutdown(grace).await;
            began.notify_one();
        };
        let grace_over = async {
            began.notified().await;
            tokio::time::sleep(grace).await;
            tracing::warn!(?grace, "calls still open after the grace period are closed");
        };
        // The builder's TCP options only apply to listeners it binds itself: set them here.
        let limits = config.limits;
        let incoming = TcpIncoming::from(grpc)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let incoming = limit_connections(incoming, limits.max_connections);
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let server = builder
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .max_concurrent_streams(limits.max_streams_per_connection)
            .layer(trace_layer())
            .layer(RpcMetricsLayer::new(Arc::clone(&running.metrics)))
            // Inside tracing and metrics, so that refused calls are logged and counted too;
            // authentication before the call limits, so that strangers cannot use them up.
            .layer(tower::util::option_layer(authenticator.map(AuthLayer::new)))
            .layer(CallLimitsLayer::new(&limits))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown);
        let served = tokio::select! {
            served = server => served,
            () = grace_over => Ok(()),
        };
        let finished = running.finish(grace).await;
        served?;
        finished
    }
}

impl<S: Store> Running<S> {
    /// The first half of shutdown, before the server stops accepting calls: single events
    /// queued are written at once; health checks stop and every service turns NOT_SERVING, so
    /// that watchers and load balancers move away first; watch streams end.
    async fn begin_shutdown(&self, grace: Duration) {
        self.group_commit.hurry();
        // The checks have stopped once this returns: none of them can set SERVING again.
        self.jobs.drain(grace).await;
        for service in health::HEALTH_SERVICES {
            self.health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }

    /// The second half, once no call is in flight: background work stops after its current
    /// step (the write queue writes what is queued; a backfill resumes on the next start),
    /// the metrics endpoint last (so that the last scrape sees the shutdown), then the pools.
    async fn finish(self, grace: Duration) -> Result<(), LaunchError> {
        self.jobs.stop(grace).await;
        let metrics_served = match self.metrics_endpoint {
            Some(endpoint) => endpoint.stop().await,
            None => Ok(()),
        };
        self.store.close().await;
        tracing::info!("server stopped");
        metrics_served
    }
}

/// Both reflection versions describe everything served, themselves included, plus
/// `google.rpc.BadRequest` so that clients can decode error details.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    DESCRIPTOR_SETS.into_iter().fold(
        tonic_reflection::server::Builder::configure().include_reflection_service(false),
        tonic_reflection::server::Builder::register_encoded_file_descriptor_set,
    )
}

/// The Prometheus endpoint, running beside the gRPC server.
struct MetricsEndpoint {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl MetricsEndpoint {
    /// Serves `metrics` on `listener`, with the state `view` applies and the pools of `store`
    /// sampled at each scrape.
    fn start<S: Store>(
        listener: TcpListener,
        metrics: Arc<ServerMetrics>,
        view: RolloutView,
        store: &Arc<S>,
    ) -> Self {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving metrics");
        }
        let store = Arc::clone(store);
        let phases = Phase::ALL.map(Phase::name);
        let schedule_statuses = crate::rollout::ScheduleStatus::ALL.map(|s| s.name());
        let scrape = move || {
            let applied = view.current();
            let config = &applied.rollout.config;
            metrics.render(&ReplicaSample {
                phase: applied.phase.name(),
                phases: &phases,
                rollout_version: config.version,
                rollout_basis_points: config.basis_points,
                kill_switch: config.kill_switch,
                guard_tripped: config.automation.tripped.is_some(),
                quarantined: applied.rollout.quarantined.len(),
                schedule: config
                    .automation
                    .schedule
                    .as_ref()
                    .map(|s| (s.step + 1, s.status.name())),
                schedule_statuses: &schedule_statuses,
                pools: &store.pool_use(),
            })
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve_metrics(listener, scrape, stopped));
        Self { stop, task }
    }

    /// Stops serving (after open scrapes finish) and reports how serving went.
    async fn stop(self) -> Result<(), LaunchError> {
        let _ = self.stop.send(());
        self.task
            .await
            .unwrap_or(Ok(()))
            .map_err(LaunchError::Metrics)
    }
}

/// Request tracing. Statuses that report the caller's mistake or a normal outcome are not
/// logged as server failures; the rest (INTERNAL, UNAVAILABLE, …) are.
fn trace_layer() -> TraceLayer<SharedClassifier<GrpcErrorsAsFailures>> {
    let classifier = [
        GrpcCode::Cancelled,
        GrpcCode::InvalidArgument,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Unauthenticated,
    ]
    .into_iter()
    .fold(
        GrpcErrorsAsFailures::new(),
        GrpcErrorsAsFailures::with_success,
    );
    TraceLayer::new(SharedClassifier::new(classifier))
}
