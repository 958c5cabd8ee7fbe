//! Wires the services, health, reflection and the tower layer stack into one server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tower_http::classify::{GrpcCode, GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::TraceLayer;

use crate::app::{GroupCommit, GroupCommitSettings, Jobs, RolloutView};
use crate::app::{Migration, Rollout, Stats};
use crate::grpc::proto::migration_service_server::MigrationServiceServer;
use crate::grpc::proto::rollout_service_server::RolloutServiceServer;
use crate::grpc::proto::stats_service_server::StatsServiceServer;
use crate::grpc::{self, MigrationApi, RolloutApi, StatsApi};
use crate::health;
use crate::migration::Phase;
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            health_check_interval: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(20),
            rollout_refresh_interval: Duration::from_millis(500),
            group_commit: GroupCommitSettings::default(),
        }
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
/// the 64 MiB budget a 128 MiB connection window gives. The budget still caps what a client
/// sending tinier frames can make a connection hold.
const HTTP2_STREAM_WINDOW: u32 = 64 * 1024;
/// See [`HTTP2_STREAM_WINDOW`].
const HTTP2_CONNECTION_WINDOW: u32 = 128 * 1024 * 1024;
/// Concurrent calls on one connection; further calls wait in the client. See
/// [`HTTP2_STREAM_WINDOW`].
const HTTP2_MAX_STREAMS: u32 = 128;

/// The encoded descriptors of everything served: reflection describes them, and the metrics
/// label calls by the methods they define.
const DESCRIPTOR_SETS: [&[u8]; 5] = [
    grpc::proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_types::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

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
}

/// Migrates `store`, then serves every service on `listeners` until `shutdown` completes;
/// in-flight calls are finished before it returns, and the database pools are closed.
pub async fn launch<S: Store>(
    listeners: impl Into<Listeners>,
    store: S,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), LaunchError> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
    } = listeners.into();
    store.migrate().await?;
    // From here on every storage call is bounded by the statement timeout.
    let store = Arc::new(Bounded::new(store));
    let rollout = RolloutView::load(store.as_ref()).await?;
    let metrics = Arc::new(ServerMetrics::new(&DESCRIPTOR_SETS));
    let metrics_endpoint = metrics_listener.map(|listener| {
        MetricsEndpoint::start(listener, Arc::clone(&metrics), rollout.clone(), &store)
    });

    let jobs = Jobs::default();
    {
        let (view, store) = (rollout.clone(), Arc::clone(&store));
        let every = config.rollout_refresh_interval;
        jobs.spawn(move |stop| view.keep_fresh(store, every, stop));
    }
    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::check_once(store.as_ref(), &reporter, config.health_check_interval).await;
    let health_task = tokio::spawn(health::watch_database(
        Arc::clone(&store),
        reporter.clone(),
        config.health_check_interval,
    ));

    // Both reflection versions describe everything served, themselves included, plus
    // `google.rpc.BadRequest` so that clients can decode error details.
    let reflection = || {
        DESCRIPTOR_SETS.into_iter().fold(
            tonic_reflection::server::Builder::configure().include_reflection_service(false),
            tonic_reflection::server::Builder::register_encoded_file_descriptor_set,
        )
    };
    let group_commit = GroupCommit::start(
        Arc::clone(&store),
        config.group_commit,
        &jobs,
        Arc::clone(&metrics),
    );
    let stats = StatsServiceServer::new(StatsApi::new(Stats::new(
        Arc::clone(&store),
        rollout.clone(),
        Arc::clone(&metrics),
        group_commit.clone(),
    )))
    .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES);

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving gRPC");
    }
    let stopping = tokio::sync::Notify::new();
    let health_checks = health_task.abort_handle();
    let shutdown = async {
        shutdown.await;
        // Single events in flight are written at once, not after their window.
        group_commit.hurry();
        // Stop the checks and wait until they have stopped, so that none of them can set
        // SERVING again after the NOT_SERVING below.
        health_task.abort();
        let _ = health_task.await;
        // Tell watchers and load balancers first, then stop accepting.
        for service in health::HEALTH_SERVICES {
            reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        stopping.notify_one();
    };
    let grace_over = async {
        stopping.notified().await;
        tokio::time::sleep(config.shutdown_grace).await;
        tracing::warn!(grace = ?config.shutdown_grace, "calls still open after the grace period are closed");
    };
    // The builder's TCP options only apply to listeners it binds itself: set them here.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_concurrent_streams(HTTP2_MAX_STREAMS)
        .layer(trace_layer())
        .layer(RpcMetricsLayer::new(Arc::clone(&metrics)))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(stats)
        .add_service(
            RolloutServiceServer::new(RolloutApi::new(Rollout::new(
                Arc::clone(&store),
                rollout.clone(),
            )))
            .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES),
        )
        .add_service(
            MigrationServiceServer::new(MigrationApi::new(Migration::new(
                Arc::clone(&store),
                jobs.clone(),
                rollout.clone(),
            )))
            .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown);
    let served = tokio::select! {
        served = server => served,
        () = grace_over => Ok(()),
    };

    health_checks.abort();
    // Background runs stop after their current batch; a stopped backfill resumes later.
    jobs.stop(config.shutdown_grace).await;
    // Metrics are served until the very end, so the last scrape sees the shutdown.
    let metrics_served = match metrics_endpoint {
        Some(endpoint) => endpoint.stop().await,
        None => Ok(()),
    };
    store.close().await;
    tracing::info!("server stopped");
    served?;
    metrics_served
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
        let scrape = move || {
            let applied = view.current();
            let config = &applied.rollout.config;
            metrics.render(&ReplicaSample {
                phase: applied.phase.name(),
                phases: &phases,
                rollout_version: config.version,
                rollout_basis_points: config.basis_points,
                kill_switch: config.kill_switch,
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
