//! Prometheus metrics, served as text on their own port (`--metrics-addr`).
//!
//! Each server owns its registry: tests run many servers in one process, so nothing here is
//! global. State that already lives elsewhere (the applied rollout, the phase, pool use) is
//! sampled when Prometheus scrapes, so it can never drift from what the replica applies.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::net::TcpListener;

use crate::domain::StorageSource;

/// The canonical name of a gRPC status code (`OK`, `INVALID_ARGUMENT`, …), as the gRPC
/// specification, grpcurl and Prometheus users spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The read of campaigns' totals (GetStats, GetStatsForCampaigns), as metrics label it.
pub const CAMPAIGN_TOTALS: &str = "campaign_totals";
/// The read of a series (GetAggregatedDailyStats), as metrics label it.
pub const DAILY_TOTALS: &str = "daily_totals";
/// The read methods reads and shadow reads are labelled by.
pub const READ_METHODS: [&str; 2] = [CAMPAIGN_TOTALS, DAILY_TOTALS];

/// The outcomes of a shadow read.
pub const SHADOW_OUTCOMES: [&str; 5] = ["match", "mismatch", "error", "timeout", "skipped"];

/// The content type of [`ServerMetrics::render`]'s output.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The method label of calls to paths no served service defines (keeps the label bounded
/// whatever clients send).
const UNKNOWN_METHOD: &str = "unknown";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    /// Full gRPC method path, e.g. `/stats.v1.StatsService/GetStats`.
    method: String,
    /// Canonical status code name, e.g. `OK`, `INVALID_ARGUMENT`.
    code: String,
    /// The storage that answered a read (`legacy`, `new`); `none` for other calls.
    source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    method: &'static str,
    source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowLabels {
    method: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabels {
    signal: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: &'static str,
    state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// How one connection pool is used right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    /// Which pool: `main`, or SQLite's `writer` and `reader`.
    pub pool: &'static str,
    /// Connections open.
    pub size: u32,
    /// Open connections waiting for work.
    pub idle: u32,
    /// Most connections the pool may open.
    pub max: u32,
}

/// What a scrape reports of the replica's state, sampled by its caller.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaSample<'a> {
    /// The migration phase the replica applies.
    pub phase: &'static str,
    /// Every phase's name: each has a gauge, 1 for the one applied.
    pub phases: &'a [&'static str],
    /// The rollout version applied, its percentage (in basis points) and kill switch.
    pub rollout_version: u64,
    pub rollout_basis_points: u32,
    pub kill_switch: bool,
    /// Whether the guard has tripped (and not been re-armed), and how many users it keeps
    /// quarantined.
    pub guard_tripped: bool,
    pub quarantined: usize,
    /// The schedule's step in effect (1-based) and status, if there is a schedule; every
    /// status in `schedule_statuses` has a gauge, 1 for the one in effect.
    pub schedule: Option<(usize, &'static str)>,
    pub schedule_statuses: &'a [&'static str],
    /// Each connection pool's use.
    pub pools: &'a [PoolUse],
}

/// One server's metrics.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    known_methods: HashSet<String>,
    rpc_duration: HistogramFamily<RpcLabels>,
    read_duration: HistogramFamily<ReadLabels>,
    recorded_batch_events: Histogram,
    group_commit_queued: Gauge,
    rollout_applied_version: Gauge,
    rollout_percentage: Gauge<f64, AtomicU64>,
    rollout_kill_switch: Gauge,
    migration_phase: Family<PhaseLabels, Gauge>,
    pool_connections: Family<PoolLabels, Gauge>,
    shadow_comparisons: Family<ShadowLabels, Counter>,
    shadow_queued: Gauge,
    shadow_dropped: Counter,
    guard_tripped: Gauge,
    guard_trips: Family<SignalLabels, Counter>,
    guard_quarantines: Counter,
    guard_quarantined: Gauge,
    guard_window_comparisons: Gauge,
    guard_window_mismatch_ratio: Gauge<f64, AtomicU64>,
    guard_window_error_ratio: Gauge<f64, AtomicU64>,
    schedule_step: Gauge,
    schedule_status: Family<StatusLabels, Gauge>,
    schedule_advances: Counter,
}

/// Latency buckets from 0.5 ms to ~16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl ServerMetrics {
    /// A registry with every metric, labelling calls by the methods that the encoded file
    /// descriptor sets define (any other path is labelled `unknown`).
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut registry = Registry::with_prefix("campaign_stats");
        let rpc_duration = HistogramFamily::<RpcLabels>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "grpc_server_handling",
            "Time until a call's response headers (for server streams: until the stream \
             opened), by method, status code and the storage that answered a read",
            prometheus_client::registry::Unit::Seconds,
            rpc_duration.clone(),
        );
        let read_duration = HistogramFamily::<ReadLabels>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "read",
            "Reads by method and the storage that answered, with their storage time",
            prometheus_client::registry::Unit::Seconds,
            read_duration.clone(),
        );
        let recorded_batch_events = Histogram::new(exponential_buckets(1.0, 4.0, 8));
        registry.register(
            "recorded_batch_events",
            "Events per stored batch (RecordEvent, RecordEvents, each StreamEvents chunk)",
            recorded_batch_events.clone(),
        );
        let group_commit_queued = Gauge::default();
        registry.register(
            "group_commit_queued_events",
            "Single events (RecordEvent) queued for a group commit or being written",
            group_commit_queued.clone(),
        );
        let rollout_applied_version = Gauge::default();
        registry.register(
            "rollout_applied_version",
            "Version of the rollout this replica routes reads by",
            rollout_applied_version.clone(),
        );
        let rollout_percentage = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "rollout_percentage",
            "Share of users whose reads go to the new storage (as applied here), in percent",
            rollout_percentage.clone(),
        );
        let rollout_kill_switch = Gauge::default();
        registry.register(
            "rollout_kill_switch",
            "1 while the kill switch is engaged (as applied here)",
            rollout_kill_switch.clone(),
        );
        let migration_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "migration_phase",
            "1 for the migration phase this replica applies, 0 for the others",
            migration_phase.clone(),
        );
        let pool_connections = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "db_pool_connections",
            "Database connections by pool and state (idle, in_use, max)",
            pool_connections.clone(),
        );
        let shadow_comparisons = Family::<ShadowLabels, Counter>::default();
        registry.register(
            "shadow_comparisons",
            "Shadow reads by read method and outcome (match, mismatch, error, timeout, skipped)",
            shadow_comparisons.clone(),
        );
        let shadow_queued = Gauge::default();
        registry.register(
            "shadow_queued_reads",
            "Shadow reads waiting for a worker",
            shadow_queued.clone(),
        );
        let shadow_dropped = Counter::default();
        registry.register(
            "shadow_dropped_reads",
            "Shadow reads dropped because the shadow queue was full",
            shadow_dropped.clone(),
        );
        let guard_tripped = Gauge::default();
        registry.register(
            "guard_tripped",
            "1 while the guard has tripped and no person has re-armed it",
            guard_tripped.clone(),
        );
        let guard_trips = Family::<SignalLabels, Counter>::default();
        registry.register(
            "guard_trips",
            "Automatic rollbacks this replica made, by the signal that tripped the guard \
             (mismatch_rate, error_rate, p99_ratio, quarantines)",
            guard_trips.clone(),
        );
        let guard_quarantines = Counter::default();
        registry.register(
            "guard_quarantines",
            "Users this replica's guard pinned to legacy because their reads disagreed",
            guard_quarantines.clone(),
        );
        let guard_quarantined = Gauge::default();
        registry.register(
            "guard_quarantined_users",
            "Users pinned to legacy by the guard now",
            guard_quarantined.clone(),
        );
        let guard_window_comparisons = Gauge::default();
        registry.register(
            "guard_window_comparisons",
            "Shadow comparisons in this replica's guard window",
            guard_window_comparisons.clone(),
        );
        let guard_window_mismatch_ratio = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "guard_window_mismatch_ratio",
            "Share of the comparisons in this replica's guard window that disagreed",
            guard_window_mismatch_ratio.clone(),
        );
        let guard_window_error_ratio = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "guard_window_error_ratio",
            "Share of new-storage reads in this replica's guard window that failed",
            guard_window_error_ratio.clone(),
        );
        let schedule_step = Gauge::default();
        registry.register(
            "schedule_step",
            "The progressive schedule's step in effect (1-based; 0 without a schedule)",
            schedule_step.clone(),
        );
        let schedule_status = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "schedule_status",
            "1 for the progressive schedule's status, 0 for the others",
            schedule_status.clone(),
        );
        let schedule_advances = Counter::default();
        registry.register(
            "schedule_advances",
            "Steps this replica advanced the progressive schedule by",
            schedule_advances.clone(),
        );
        // Every bounded label value is exported from the start, at zero: a dashboard's rate()
        // and an alert on a series that does not exist yet would otherwise see nothing.
        for method in READ_METHODS {
            for source in [StorageSource::Legacy, StorageSource::New] {
                let _ = read_duration.get_or_create(&ReadLabels {
                    method,
                    source: source.name(),
                });
            }
            for outcome in SHADOW_OUTCOMES {
                let _ = shadow_comparisons.get_or_create(&ShadowLabels { method, outcome });
            }
        }
        Self {
            registry,
            known_methods: known_methods(descriptor_sets),
            guard_tripped,
            guard_trips,
            guard_quarantines,
            guard_quarantined,
            guard_window_comparisons,
            guard_window_mismatch_ratio,
            guard_window_error_ratio,
            schedule_step,
            schedule_status,
            schedule_advances,
            shadow_comparisons,
            shadow_queued,
            shadow_dropped,
            rpc_duration,
            read_duration,
            recorded_batch_events,
            group_commit_queued,
            rollout_applied_version,
            rollout_percentage,
            rollout_kill_switch,
            migration_phase,
            pool_connections,
        }
    }

    /// Counts a finished call to `path` (the HTTP/2 path of the gRPC method), answered from
    /// `source` when it was a read.
    pub fn observe_rpc(
        &self,
        path: &str,
        code: tonic::Code,
        source: Option<StorageSource>,
        took: Duration,
    ) {
        let method = if self.known_methods.contains(path) {
            path
        } else {
            UNKNOWN_METHOD
        };
        let labels = RpcLabels {
            method: method.to_owned(),
            code: code_name(code).to_owned(),
            source: source.map_or("none", StorageSource::name),
        };
        self.rpc_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Counts a read answered by `source`.
    pub fn observe_read(&self, method: &'static str, source: StorageSource, took: Duration) {
        let labels = ReadLabels {
            method,
            source: source.name(),
        };
        self.read_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Counts a shadow read of `method` that ended with `outcome`.
    pub fn observe_shadow(&self, method: &'static str, outcome: &'static str) {
        self.shadow_comparisons
            .get_or_create(&ShadowLabels { method, outcome })
            .inc();
    }

    /// The gauge of shadow reads waiting (its owner adds and takes away).
    pub fn shadow_queued(&self) -> Gauge {
        self.shadow_queued.clone()
    }

    /// Counts a shadow read dropped for want of room.
    pub fn shadow_dropped(&self) {
        self.shadow_dropped.inc();
    }

    /// Exports the trip counter of each of `signals` from the start, at zero.
    pub fn expect_guard_signals(&self, signals: impl IntoIterator<Item = &'static str>) {
        for signal in signals {
            let _ = self.guard_trips.get_or_create(&SignalLabels { signal });
        }
    }

    /// Counts a rollback by the guard, tripped by `signal`.
    pub fn guard_tripped(&self, signal: &'static str) {
        self.guard_trips
            .get_or_create(&SignalLabels { signal })
            .inc();
    }

    /// Counts a user quarantined by the guard.
    pub fn guard_quarantined(&self) {
        self.guard_quarantines.inc();
    }

    /// Sets the guard window's figures: comparisons, and the shares that disagreed and
    /// (of new-storage reads) failed.
    pub fn guard_window(&self, comparisons: u64, mismatch_ratio: f64, error_ratio: f64) {
        self.guard_window_comparisons
            .set(i64::try_from(comparisons).unwrap_or(i64::MAX));
        self.guard_window_mismatch_ratio.set(mismatch_ratio);
        self.guard_window_error_ratio.set(error_ratio);
    }

    /// Counts a step the schedule advanced.
    pub fn schedule_advanced(&self) {
        self.schedule_advances.inc();
    }

    /// Counts a stored batch of `events` events.
    pub fn observe_batch(&self, events: usize) {
        self.recorded_batch_events.observe(events as f64);
    }

    /// The gauge of single events queued for a group commit (its owner adds and takes away).
    pub fn group_commit_queued(&self) -> Gauge {
        self.group_commit_queued.clone()
    }

    /// The metrics as OpenMetrics text, with the replica's state set from `sample`.
    pub fn render(&self, sample: &ReplicaSample<'_>) -> String {
        self.rollout_applied_version
            .set(i64::try_from(sample.rollout_version).unwrap_or(i64::MAX));
        self.rollout_percentage
            .set(f64::from(sample.rollout_basis_points) / 100.0);
        self.rollout_kill_switch.set(i64::from(sample.kill_switch));
        self.guard_tripped.set(i64::from(sample.guard_tripped));
        self.guard_quarantined
            .set(i64::try_from(sample.quarantined).unwrap_or(i64::MAX));
        self.schedule_step.set(
            sample
                .schedule
                .map_or(0, |(step, _)| i64::try_from(step).unwrap_or(i64::MAX)),
        );
        for &status in sample.schedule_statuses {
            let current = sample.schedule.is_some_and(|(_, s)| s == status);
            self.schedule_status
                .get_or_create(&StatusLabels { status })
                .set(i64::from(current));
        }
        for &phase in sample.phases {
            self.migration_phase
                .get_or_create(&PhaseLabels { phase })
                .set(i64::from(phase == sample.phase));
        }
        for pool in sample.pools {
            for (state, connections) in [
                ("idle", pool.idle),
                ("in_use", pool.size.saturating_sub(pool.idle)),
                ("max", pool.max),
            ] {
                let labels = PoolLabels {
                    pool: pool.pool,
                    state,
                };
                self.pool_connections
                    .get_or_create(&labels)
                    .set(i64::from(connections));
            }
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Every `/package.Service/Method` path the descriptor sets define.
fn known_methods(descriptor_sets: &[&[u8]]) -> HashSet<String> {
    let mut paths = HashSet::new();
    for set in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
            continue;
        };
        for file in set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let service_name = match package {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    paths.insert(format!("/{service_name}/{}", method.name()));
                }
            }
        }
    }
    paths
}

/// Serves `GET /metrics` on `listener` with what `scrape` renders, until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    scrape: impl Fn() -> String + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let scrape = Arc::new(scrape);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let scrape = Arc::clone(&scrape);
            async move { ([(CONTENT_TYPE, OPENMETRICS_TEXT)], scrape()) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_known_methods_by_path_and_the_rest_as_unknown() {
        let metrics = ServerMetrics::new(&[crate::grpc::proto::FILE_DESCRIPTOR_SET]);
        metrics.observe_rpc(
            "/stats.v1.StatsService/GetStats",
            tonic::Code::Ok,
            Some(StorageSource::New),
            Duration::from_millis(3),
        );
        metrics.observe_rpc(
            "/made.up/Path",
            tonic::Code::Unimplemented,
            None,
            Duration::from_millis(1),
        );
        let text = metrics.render(&ReplicaSample {
            phase: "VERIFIED",
            phases: &["DUAL_WRITE", "VERIFIED"],
            rollout_version: 7,
            rollout_basis_points: 1_250,
            kill_switch: false,
            guard_tripped: true,
            quarantined: 2,
            schedule: Some((3, "running")),
            schedule_statuses: &["running", "halted"],
            pools: &[],
        });
        assert!(
            text.contains(
                r#"campaign_stats_grpc_server_handling_seconds_count{method="/stats.v1.StatsService/GetStats",code="OK",source="new"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"campaign_stats_grpc_server_handling_seconds_count{method="unknown",code="UNIMPLEMENTED",source="none"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains("made.up"), "{text}");
        assert!(
            text.contains("campaign_stats_rollout_applied_version 7\n"),
            "{text}"
        );
        assert!(
            text.contains("campaign_stats_rollout_percentage 12.5\n"),
            "{text}"
        );
        assert!(
            text.contains(r#"campaign_stats_migration_phase{phase="VERIFIED"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"campaign_stats_migration_phase{phase="DUAL_WRITE"} 0"#),
            "{text}"
        );
    }
}
